"""The UI as a person uses it: `dagster dev` on a small real category, the whole graph launched through
GraphQL, the asset graph and the metric report looked at in headless Chromium, and the LoRA adapter's
caption lineage read back through GraphQL.

Needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver; scripts/test.sh
installs them through scripts/setup_browser.sh). Missing, the test fails and says so, unless
SREC_SKIP_BROWSER=1. SREC_UPDATE_SCREENSHOTS=1 also writes the screenshots to docs/images/.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from srec.paths import PROJECT_ROOT, SHARED_DATA_DIR

pytestmark = pytest.mark.slow

CATEGORY = "scientific_ui"
N_USERS = 30
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
DOCS_IMAGES = PROJECT_ROOT / "docs" / "images"
SERVER_START_TIMEOUT_S = 300
RUN_TIMEOUT_S = 1500
PAGE_TIMEOUT_S = 90

# Small enough for about a minute on 2 cores: one LoRA epoch (the tiny model's learning rate, as the demo's),
# one trained variant + zero-shot, short prompts, 8 validation users, recurrent summaries only, popularity as the
# only baseline. The code location's executor runs the ~45 steps in the run worker's process.
REC = {"variants": ["lora:fused+recurrent", "zero-shot"], "epochs": 1, "batch_size": 4, "patience": 0,
       "learning_rate": 0.005, "valid_users": 8, "history_items": 5, "max_length": 512}
RUN_CONFIG = {
    "ops": {
        "sft_examples": {"config": REC}, "lora_adapter": {"config": REC}, "recommender_scores": {"config": REC},
        "user_preferences": {"config": {"modes": ["recurrent"]}},
        "baseline_scores": {"config": {"max_epochs": 1, "models": ["popularity"]}},
    },
}
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1000", "--hide-scrollbars"]


def _browser_or_fail() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.is_file()]
    if not missing:
        return
    if os.environ.get("SREC_SKIP_BROWSER") == "1":
        pytest.skip(f"SREC_SKIP_BROWSER=1 and {missing} missing")
    pytest.fail(f"{', '.join(missing)} missing: the browser test needs Debian's chromium and chromium-driver. "
                "Run `bash scripts/setup_browser.sh` as root (scripts/test.sh does), or set SREC_SKIP_BROWSER=1 "
                "to skip this test.", pytrace=False)


# ---------------------------------------------------------------------------------------------- the server


def _own_session() -> None:
    """In the child: its own process group, and Ctrl-C's default action even when pytest was started in the
    background of a non-interactive shell (which ignores SIGINT, and `dagster dev` stops on SIGINT)."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class DagsterDev:
    """`dagster dev -w workspace.yaml` on loopback in its own process group, with its log in a file."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(self.port)],
            cwd=PROJECT_ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, preexec_fn=_own_session)

    def log_tail(self, chars: int = 20000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"----- dagster dev log ({self.log_path}) -----\n{text[-chars:]}"

    def gql(self, query: str, variables: dict | None = None, timeout: float = 60) -> dict:
        req = urllib.request.Request(f"{self.url}/graphql", data=json.dumps({"query": query, "variables": variables or {}}
                                                                            ).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = json.loads(resp.read())
        if body.get("errors"):
            raise AssertionError(f"GraphQL errors: {json.dumps(body['errors'], indent=1)[:4000]}")
        return body["data"]

    def wait_loaded(self, timeout: float = SERVER_START_TIMEOUT_S) -> None:
        """Until the webserver answers and the code location `srec` is loaded (fails at once on a load error)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited with {self.proc.returncode} before the UI was up")
            try:
                data = self.gql("{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus "
                                "locationOrLoadError { __typename ... on PythonError { message } } } } } }", timeout=10)
                entries = {e["name"]: e for e in data["workspaceOrError"].get("locationEntries", [])}
                entry = entries.get("srec")
                last = json.dumps(entry)
                if entry and entry["loadStatus"] == "LOADED":
                    loc = entry["locationOrLoadError"] or {}
                    if loc.get("__typename") == "RepositoryLocation":
                        return
                    if loc.get("__typename") == "PythonError":
                        raise AssertionError(f"code location srec failed to load: {loc['message']}")
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as e:
                last = repr(e)
            time.sleep(1)
        raise AssertionError(f"the code location srec was not loaded after {timeout}s (last: {last})")

    def stop(self) -> None:
        """SIGINT to `dagster dev` (Ctrl-C: it shuts its webserver, daemon and code server down), then SIGKILL to
        whatever of its process group is left."""
        for sig, wait_s in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
            try:
                if sig == signal.SIGINT:
                    os.kill(self.proc.pid, sig)
                else:
                    os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and _group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.25)
            if not _group_alive(self.proc.pid):
                break
        self.proc.poll()
        self._log.close()


def _group_alive(pgid: int) -> bool:
    """Whether a process of the group is still running (zombies do not count: PID 1 may never reap them)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":  # fields after the name: state, ppid, pgrp
            return True
    return False


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _server_log_on_failure(server: DagsterDev):
    try:
        yield
    except BaseException:
        print(server.log_tail())  # pytest shows a failing test's captured output
        raise


# ---------------------------------------------------------------------------------------------- the data


def _write_category(folder: Path) -> Path:
    """The first N_USERS users of the shared Amazon Scientific data and their items, as an extra category file."""
    inter = json.loads((SHARED_DATA_DIR / "amazon-scientific" / "Scientific.inter.json").read_text())
    meta = json.loads((SHARED_DATA_DIR / "amazon-scientific" / "Scientific.item.json").read_text())
    users = dict(list(inter.items())[:N_USERS])
    items = sorted({str(i) for seq in users.values() for i in seq}, key=int)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "inter.json").write_text(json.dumps(users))
    (folder / "items.json").write_text(json.dumps({i: meta[i] for i in items}))
    path = folder / "categories.yaml"
    path.write_text(
        "categories:\n"
        f"  {CATEGORY}:\n"
        f"    description: The first {N_USERS} users of Amazon Scientific (tests/test_ui_browser.py)\n"
        "    format: inter_item_json\n"
        "    reviews: inter.json\n"
        "    items: items.json\n"
        "    filtering: {user_k_core: 3, item_k_core: 1}\n")
    return path


# ---------------------------------------------------------------------------------------------- the run

RUN_STATUS = "query($id: ID!) { runOrError(runId: $id) { __typename ... on Run { status } ... on PythonError { message } } }"
RUN_ERRORS = """query($id: ID!, $cursor: String) { logsForRun(runId: $id, afterCursor: $cursor) { __typename
  ... on EventConnection { cursor hasMore events { __typename
    ... on MessageEvent { message stepKey level }
    ... on ErrorEvent { error { message stack cause { message stack } } } } }
  ... on PythonError { message } } }"""


def _launch_full_graph(server: DagsterDev) -> str:
    params = {"selector": {"repositoryLocationName": "srec", "repositoryName": "__repository__", "jobName": "full_graph"},
              "runConfigData": RUN_CONFIG,
              "executionMetadata": {"tags": [{"key": "dagster/partition", "value": CATEGORY}]}}
    data = server.gql("""mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
        ... on LaunchRunSuccess { run { runId } }
        ... on RunConfigValidationInvalid { errors { message } }
        ... on PythonError { message stack }
        ... on Error { message } } }""", {"p": params})
    result = data["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", f"launchRun failed: {json.dumps(result, indent=1)[:4000]}"
    return result["run"]["runId"]


def _run_errors(server: DagsterDev, run_id: str) -> str:
    lines, cursor = [], None
    for _ in range(100):
        conn = server.gql(RUN_ERRORS, {"id": run_id, "cursor": cursor})["logsForRun"]
        if conn["__typename"] != "EventConnection":
            return json.dumps(conn)
        for e in conn["events"]:
            if e.get("error") or e.get("level") == "ERROR" or "Failure" in e["__typename"]:
                err = e.get("error") or {}
                lines.append(f"{e['__typename']} {e.get('stepKey') or ''}: {e.get('message', '')}\n"
                             f"{err.get('message', '')}{err.get('stack') and ''.join(err['stack'][-8:]) or ''}")
        cursor = conn["cursor"]
        if not conn["hasMore"]:
            break
    return "\n".join(lines)


def _wait_for_run(server: DagsterDev, run_id: str, timeout: float = RUN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        run = server.gql(RUN_STATUS, {"id": run_id})["runOrError"]
        assert run["__typename"] == "Run", run
        status = run["status"]
        if status == "SUCCESS":
            return
        if status in ("FAILURE", "CANCELED"):
            raise AssertionError(f"run {run_id} ended {status}:\n{_run_errors(server, run_id)}")
        time.sleep(2)
    raise AssertionError(f"run {run_id} still {status} after {timeout}s:\n{_run_errors(server, run_id)}")


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """`dagster dev` with a fresh instance and data folder, after the whole graph ran for CATEGORY."""
    _browser_or_fail()
    root = tmp_path_factory.mktemp("ui")
    home, data = root / "dagster_home", root / "data"
    home.mkdir()
    # The project's instance config (run queue, pools), as the persistent home has it now.
    shutil.copy(PROJECT_ROOT / "data" / "dagster_home" / "dagster.yaml", home / "dagster.yaml")
    env = {**os.environ,
           "DAGSTER_HOME": str(home), "SREC_DATA_DIR": str(data),
           "SREC_CATEGORIES_EXTRA": str(_write_category(root / "category")),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1",
           # The weekly retrain schedule is on by default: keep its tick (Monday 03:00) out of the test's minutes.
           "SREC_RETRAIN_CRON": "0 3 1 1 *"}
    for key in ("SREC_CAPTIONER_MODEL", "SREC_SUMMARISER_MODEL", "SREC_RECOMMENDER_MODEL", "SREC_CLIP_MODEL"):
        env.pop(key, None)  # the tiny offline models under SREC_DATA_DIR/models
    # The tiny offline models, built once before any step wants them (steps would race to build them).
    built = subprocess.run([sys.executable, "-m", "srec_assets.cli", "build-tiny-models", "--out", str(data / "models")],
                           cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, f"srec build-tiny-models failed:\n{built.stdout}\n{built.stderr}"

    server = DagsterDev(env, root / "dagster_dev.log")
    try:
        with _server_log_on_failure(server):
            server.wait_loaded()
            started = time.monotonic()
            run_id = _launch_full_graph(server)
            _wait_for_run(server, run_id)
            print(f"full_graph for {CATEGORY}: run {run_id} succeeded in {time.monotonic() - started:.0f}s")
        yield {"server": server, "run_id": run_id, "root": root, "data": data, "shots": root / "screenshots"}
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------- the browser

ALL_ASSETS = ["raw_reviews", "raw_items", "interactions", "eval_candidates", "item_images", "item_captions",
              "user_preferences", "sft_examples", "lora_adapter", "recommender_scores", "baseline_scores",
              "metric_report"]


@pytest.fixture(scope="module")
def browser(ui, tmp_path_factory):
    """Headless Chromium at 1600x1000, the main navigation collapsed, Dagster's one-time welcome dialog seen."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    server = ui["server"]
    # What "Skip" on the "Join the Dagster community" dialog records (it would cover the first page).
    assert server.gql("mutation { setNuxSeen }")["setNuxSeen"] is True
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT_S)
        # The page itself 1600x1000 (a window that size leaves less to the page).
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1600, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        driver.get(f"{server.url}/server_info")
        driver.execute_script("window.localStorage.setItem('dagster-nav-collapsed', 'true')")
        yield driver
    finally:
        driver.quit()


def _body_text(driver) -> str:
    return driver.execute_script("return document.body ? document.body.innerText : ''") or ""


def _wait_for_text(driver, texts: list[str], timeout: float = PAGE_TIMEOUT_S) -> str:
    """Until every text is on the page; fails with what the page says instead."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = _body_text(driver)
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    missing = [t for t in texts if t not in body]
    raise AssertionError(f"{driver.current_url}: {missing} not shown after {timeout}s; the page says:\n{body[:3000]}")


def _wait_until_painted(driver, seconds: float = 2.0) -> None:
    """Let animations (the graph's zoom to fit, a dialog's fade-in) finish and spinners go."""
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while time.monotonic() < deadline and driver.execute_script(
            "return document.querySelectorAll('.bp5-spinner, [class*=Spinner_spinner]').length"):
        time.sleep(0.5)
    time.sleep(seconds)


def _screenshot(driver, name: str, folder: Path, docs: bool = True) -> Path:
    """A screenshot under the test's folder; with SREC_UPDATE_SCREENSHOTS=1 (and docs) also in docs/images/."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert driver.save_screenshot(str(path)), f"screenshot {path} failed"
    assert path.stat().st_size > 20_000, f"{path}: {path.stat().st_size} bytes, an empty page?"
    if docs and os.environ.get("SREC_UPDATE_SCREENSHOTS") == "1":
        DOCS_IMAGES.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, DOCS_IMAGES / name)
    print(f"screenshot: {path}")
    return path


def test_asset_graph_page_shows_every_asset(ui, browser, tmp_path):
    server = ui["server"]
    with _server_log_on_failure(server):
        groups = sorted({n["groupName"] for n in server.gql("{ assetNodes { groupName } }")["assetNodes"]})
        # The global lineage with every group expanded (what "Expand all groups" does), as the URL records it;
        # both forms of group id this UI uses (global, and per code location).
        expanded = ",".join([f"global@global:{g}" for g in groups] + [f"__repository__@srec:{g}" for g in groups])
        browser.get(f"{server.url}/asset-groups?expanded={expanded}")
        _wait_for_text(browser, ["Global asset lineage", *groups, *ALL_ASSETS])
        _wait_until_painted(browser)
        _screenshot(browser, "asset_graph.png", ui["shots"])


def test_metric_report_page_shows_the_materialization(ui, browser, tmp_path):
    from selenium.webdriver.common.by import By

    server = ui["server"]
    with _server_log_on_failure(server):
        # The asset's Partitions tab with the category picked: its latest materialization and metadata.
        browser.get(f"{server.url}/assets/metric_report?view=partitions&partition={CATEGORY}")
        _wait_for_text(browser, ["metric_report", CATEGORY, "Materialized", ui["run_id"][:8], "full_graph",
                                 "report_md", "metrics", "chart", "models", "provenance", "tiny, random weights"])
        _wait_until_painted(browser, 1)
        _screenshot(browser, "metric_report_metadata.png", ui["shots"], docs=False)
        # The report's tables: the `metrics` entry's [Show Markdown], as a person clicks it.
        row = browser.find_element(By.XPATH, "//tr[td[normalize-space()='metrics']]")
        row.find_element(By.XPATH, ".//a[contains(., 'Show Markdown')]").click()
        body = _wait_for_text(browser, ["1+20", "1+99", "full_ranking", "AUC", "NDCG@10", "popularity",
                                        "LLM lora:fused+recurrent", "LLM zero-shot", "Close"])
        assert "[0." in body  # bootstrap intervals
        _wait_until_painted(browser)
        _screenshot(browser, "metric_report.png", ui["shots"])


# ---------------------------------------------------------------------------------------------- lineage

MATERIALIZATIONS = """query($key: AssetKeyInput!, $partition: String!) {
  assetOrError(assetKey: $key) { __typename ... on Asset {
    assetMaterializations(partitions: [$partition]) {
      runId partition timestamp stepKey
      tags { key value }
      metadataEntries { label ... on TextMetadataEntry { text } } } } } }"""
DATA_VERSIONS = """query($partition: String!) {
  assetNodes(assetKeys: [{path: ["lora_adapter"]}, {path: ["item_captions"]}]) {
    assetKey { path } dataVersion(partition: $partition) dependencyKeys { path } } }"""


def _materializations(server: DagsterDev, asset: str) -> list[dict]:
    data = server.gql(MATERIALIZATIONS, {"key": {"path": [asset]}, "partition": CATEGORY})["assetOrError"]
    assert data["__typename"] == "Asset", data
    return data["assetMaterializations"]


def _meta(event: dict, label: str) -> str | None:
    return next((e.get("text") for e in event["metadataEntries"] if e["label"] == label), None)


def test_lora_adapter_lineage_names_its_caption_materialization(ui):
    server = ui["server"]
    with _server_log_on_failure(server):
        adapters = _materializations(server, "lora_adapter")
        assert adapters, "no lora_adapter materialization for the partition"
        adapter = adapters[0]  # newest first
        assert adapter["runId"] == ui["run_id"] and adapter["partition"] == CATEGORY
        snapshot = _meta(adapter, "caption_snapshot")
        assert snapshot, f"lora_adapter has no caption_snapshot metadata: {adapter['metadataEntries']}"

        # The item_captions materialization whose captions the adapter was trained on, and the run that made it.
        captions = _materializations(server, "item_captions")
        same = [c for c in captions if _meta(c, "caption_snapshot") == snapshot]
        assert same, (f"no item_captions materialization with caption_snapshot {snapshot}: "
                      f"{[_meta(c, 'caption_snapshot') for c in captions]}")
        assert same[0]["runId"] == ui["run_id"] and same[0]["partition"] == CATEGORY

        # Dagster's own provenance agrees: item_captions' data version (per partition) is the caption snapshot,
        # and the adapter's materialization records the data version of each upstream asset it read. For a
        # partitioned upstream that is sha256 over the data versions of the partitions read (here: one).
        nodes = {n["assetKey"]["path"][0]: n for n in server.gql(DATA_VERSIONS, {"partition": CATEGORY})["assetNodes"]}
        assert nodes["item_captions"]["dataVersion"] == snapshot
        assert {"path": ["item_captions"]} in nodes["lora_adapter"]["dependencyKeys"]
        tags = {t["key"]: t["value"] for t in adapter["tags"]}
        assert tags.get("dagster/input_data_version/item_captions") == hashlib.sha256(snapshot.encode()).hexdigest(), tags
        assert tags.get("dagster/input_event_pointer/item_captions", "").isdigit(), tags
        assert tags.get("dagster/data_version") == nodes["lora_adapter"]["dataVersion"] == _meta(adapter, "version"), tags
