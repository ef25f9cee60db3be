"""Fused item captions: caching, incremental captioning, failures, and resuming a killed run."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import pytest
from PIL import Image

from srec.captions import CaptionSettings, build_item_captions, caption_snapshot
from srec.db import ensure_tables
from srec.models.generation import GenerationResult, ModelIdentity
from srec.models.runner import LoadedModel, RunnerSettings
from srec.paths import PROJECT_ROOT, SHARED_DATA_DIR
from srec.schemas import validate_partition

CAT = "beauty"


def _real_items(n: int, skip: int = 0) -> list[tuple[str, str]]:
    lines = (SHARED_DATA_DIR / "amazon-beauty" / "item_titles.csv").read_text().splitlines()[1 + skip : 1 + skip + n]
    return [tuple(line.split(",", 1)) for line in lines]  # type: ignore[misc]


def add_items(con, items, image_dir: Path, *, status: str = "ok") -> None:
    """raw_items + item_images rows for real item ids/titles; 'ok' items get a small real image file."""
    ensure_tables(con)
    for i, (item_id, title) in enumerate(items):
        con.execute("INSERT INTO raw_items (category, item_id, title, source_file, source_line) VALUES (?, ?, ?, 'x', ?)",
                    [CAT, item_id, title, i + 1])
        path = sha = None
        if status == "ok":
            path = image_dir / f"{item_id}.png"
            Image.new("RGB", (24, 24), (i * 7 % 255, 90, 160)).save(path)
            sha = f"{i:064x}"
        con.execute(
            "INSERT INTO item_images (category, item_id, status, reason, source, synthetic, image_path, image_sha256, "
            "width, height) VALUES (?, ?, ?, ?, 'placeholder', TRUE, ?, ?, ?, ?)",
            [CAT, item_id, status, None if status == "ok" else "invalid image: truncated", str(path) if path else None,
             sha, 24 if path else None, 24 if path else None],
        )


class EchoModel:
    """A deterministic stand-in for the captioner: the caption is the prompt's title line. Records batches."""

    def __init__(self, fail_on: str | None = None):
        self.batches: list[int] = []
        self.fail_on = fail_on
        self.identity = ModelIdentity("echo", "f0", (("max_new_tokens", 8),))

    def generate(self, requests):
        self.batches.append(len(requests))
        out = []
        for r in requests:
            if self.fail_on and self.fail_on in r.prompt:
                raise RuntimeError(f"cannot caption {self.fail_on}")
            title = next(line for line in r.prompt.splitlines() if line.startswith("Title:"))
            out.append(GenerationResult(f"{'[img] ' if r.image_path else ''}{title}", 3))
        return out


@pytest.fixture
def cat_con(tmp_path):
    con = duckdb.connect(str(tmp_path / "c.duckdb"))
    (tmp_path / "img").mkdir()
    add_items(con, _real_items(30), tmp_path / "img")
    add_items(con, _real_items(5, skip=30), tmp_path / "img", status="invalid")
    yield con
    con.close()


def test_captions_cached_and_incremental(cat_con, tmp_path):
    model = EchoModel()
    s = CaptionSettings(chunk_size=8)
    first = build_item_captions(cat_con, CAT, model.generate, model.identity, s)
    assert (first.items, first.ok, first.new, first.cached, first.failed) == (35, 35, 35, 0, 0)
    assert (first.with_image, first.text_only) == (30, 5)
    assert model.batches == [8, 8, 8, 8, 3]  # generation happens in chunks, each committed
    rows = cat_con.execute("SELECT modality, caption FROM item_captions WHERE category = ?", [CAT]).fetchall()
    assert sum(c.startswith("[img] ") for m, c in rows if m == "image+text") == 30
    assert not any(c.startswith("[img] ") for m, c in rows if m == "text")  # no image: the text-only prompt
    assert validate_partition(cat_con, "item_captions", CAT).passed
    assert validate_partition(cat_con, "caption_cache", CAT).passed

    # A second materialization captions nothing and gives the same snapshot.
    model.batches.clear()
    again = build_item_captions(cat_con, CAT, model.generate, model.identity, s)
    assert (again.new, again.cached, model.batches) == (0, 35, [])
    assert again.snapshot == first.snapshot == caption_snapshot(cat_con, CAT)

    # New items: only those are captioned. A changed title: only that item.
    add_items(cat_con, _real_items(3, skip=40), tmp_path / "img")
    cat_con.execute("UPDATE raw_items SET title = title || ' (refill)' WHERE item_id = ?", [_real_items(1)[0][0]])
    third = build_item_captions(cat_con, CAT, model.generate, model.identity, s)
    assert (third.items, third.new, third.cached) == (38, 4, 34)
    assert third.snapshot != first.snapshot

    # Another model or other generation settings: a different cache key for every item.
    other = ModelIdentity("echo", "f0", (("max_new_tokens", 16),))
    assert build_item_captions(cat_con, CAT, model.generate, other, s).new == 38
    (n_cache,) = cat_con.execute("SELECT count(*) FROM caption_cache").fetchall()[0]
    assert n_cache == 35 + 4 + 38


def test_a_failing_item_is_recorded_not_fatal_and_retried_later(cat_con):
    bad_title = _real_items(3)[2][1]
    model = EchoModel(fail_on=bad_title)
    stats = build_item_captions(cat_con, CAT, model.generate, model.identity, CaptionSettings(chunk_size=8))
    assert (stats.ok, stats.failed) == (34, 1)
    status, reason, caption = cat_con.execute(
        "SELECT status, reason, caption FROM item_captions WHERE item_id = ?", [_real_items(3)[2][0]]
    ).fetchall()[0]
    assert status == "failed" and caption is None and "RuntimeError: cannot caption" in reason
    assert validate_partition(cat_con, "item_captions", CAT).passed
    # Failures are not cached: the next run (model fixed) generates exactly that item.
    fixed = EchoModel()
    assert build_item_captions(cat_con, CAT, fixed.generate, model.identity, CaptionSettings()).new == 1


def test_image_gone_at_generation_time_fails_that_item_only(cat_con, tiny_models, tmp_path):
    victim = _real_items(1)[0][0]
    (tmp_path / "img" / f"{victim}.png").unlink()
    m = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"]), max_new_tokens=6, max_batch_size=16))
    stats = build_item_captions(cat_con, CAT, m.generate, m.identity, CaptionSettings(chunk_size=16))
    assert (stats.ok, stats.failed) == (34, 1)
    assert "FileNotFoundError" in stats.failures[victim]


def test_tiny_captioner_with_clip_scores(cat_con, tiny_models):
    from srec.models.clip import ClipScorer, ClipSettings

    m = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"]), max_new_tokens=8, max_batch_size=16))
    clip = ClipScorer(ClipSettings(str(tiny_models["clip"])))
    stats = build_item_captions(cat_con, CAT, m.generate, m.identity, CaptionSettings(chunk_size=16),
                                clip_score=clip.score, clip_model="tiny-clip")
    assert stats.ok == 35 and stats.clip_scored == 30
    rows = cat_con.execute("SELECT modality, clip_score, clip_model, generated_tokens, model_fingerprint, "
                           "prompt_version, image_synthetic FROM item_captions").fetch_df()
    img, txt = rows[rows.modality == "image+text"], rows[rows.modality == "text"]
    assert img.clip_score.between(-1, 1).all() and txt.clip_score.isna().all()
    assert set(img.clip_model) == {"tiny-clip"} and img.image_synthetic.all()
    assert rows.generated_tokens.between(1, 8).all() and set(rows.model_fingerprint) == {m.fingerprint}
    assert {v.split("/")[0] for v in rows.prompt_version} == {"caption_fused", "caption_text_only"}


WORKER = textwrap.dedent("""
    import sys, duckdb
    from srec.captions import CaptionSettings, build_item_captions
    from srec.models.runner import LoadedModel, RunnerSettings
    con = duckdb.connect(sys.argv[1])
    m = LoadedModel(RunnerSettings(model=sys.argv[2], max_new_tokens=12, max_batch_size=8))
    build_item_captions(con, "beauty", m.generate, m.identity, CaptionSettings(chunk_size=8),
                        run_id="killed-run", progress=lambda msg: print(msg, flush=True))
    print("finished", flush=True)
""")


def test_killed_run_resumes_without_duplicates_or_losses(tmp_path, tiny_models):
    db, ref_db = tmp_path / "killed.duckdb", tmp_path / "reference.duckdb"
    (tmp_path / "img").mkdir()
    items = _real_items(120)
    for path in (db, ref_db):
        with duckdb.connect(str(path)) as con:
            add_items(con, items, tmp_path / "img")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(db), str(tiny_models["captioner"])],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    committed = 0
    deadline = time.monotonic() + 180
    for line in proc.stdout:  # kill it once three chunks are committed, while the fourth is generating
        if line.startswith("caption chunk"):
            committed += 1
            if committed == 3:
                proc.send_signal(signal.SIGKILL)
                break
        assert time.monotonic() < deadline and not line.startswith("finished")
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    m = LoadedModel(RunnerSettings(model=str(tiny_models["captioner"]), max_new_tokens=12, max_batch_size=8))
    with duckdb.connect(str(db)) as con:
        survived = con.execute("SELECT count(*) FROM caption_cache WHERE run_id = 'killed-run'").fetchall()[0][0]
        assert survived >= 24 and survived % 8 == 0 and survived < 120  # whole chunks, committed before the kill
        resumed = build_item_captions(con, CAT, m.generate, m.identity, CaptionSettings(chunk_size=8), run_id="resume")
        assert (resumed.new, resumed.cached, resumed.ok) == (120 - survived, survived, 120)
        keys = con.execute("SELECT count(*), count(DISTINCT cache_key) FROM caption_cache").fetchall()[0]
        assert keys == (120, 120)
        resumed_rows = con.execute("SELECT item_id, caption FROM item_captions ORDER BY item_id").fetchall()
    with duckdb.connect(str(ref_db)) as con:
        build_item_captions(con, CAT, m.generate, m.identity, CaptionSettings(chunk_size=8))
        reference_rows = con.execute("SELECT item_id, caption FROM item_captions ORDER BY item_id").fetchall()
    assert resumed_rows == reference_rows  # nothing lost, nothing duplicated, same captions as an unbroken run
