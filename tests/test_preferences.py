"""User preference summaries: block structure, leakage, temporal lines, profile, batching, cache, failures.

The model is an "echo" generator: its summary lists the item lines it found in the prompt (and the
previous summary it was given), so what reaches a summary is visible end to end.
"""
from __future__ import annotations

import json
import math
import re

import duckdb
import pandas as pd
import pytest

import srec.prompts as prompts
from srec.db import ensure_tables
from srec.models.generation import GenerationRequest, GenerationResult, ModelIdentity
from srec.preferences import PreferenceSettings, build_user_preferences, plan_preferences, step_request
from srec.schemas import validate_partition
from srec.paths import SHARED_DATA_DIR
from tests.loo_tables import loo_frames, read_p5_sequences

BEAUTY_DIR = SHARED_DATA_DIR / "amazon-beauty"
CAT = "beauty_cut"
HAND = "hand"
IDENT = ModelIdentity("fake/echo", "fp0", (("do_sample", False), ("max_new_tokens", 64)))
SNAP = "captions-v1"
DAY = 86_400
T0 = 1_400_000_000  # 2014-05-13 16:53:20 UTC

ITEM_LINE = re.compile(r"^\d+\. (?:\(most recent\) )?(?:\[[^\]]*\] )?(.+)$", re.M)
PREVIOUS = re.compile(r"so far:\n(.*)\nTheir next purchases", re.S)


class Interrupted(BaseException):
    """Like KeyboardInterrupt: not an Exception, so nothing may swallow it."""


class Echo:
    """Deterministic fake model; records every batch it is called with."""

    def __init__(self, fail_on: str | None = None, interrupt_after: int | None = None):
        self.calls: list[list[GenerationRequest]] = []
        self.fail_on, self.interrupt_after = fail_on, interrupt_after

    def __call__(self, requests):
        requests = list(requests)
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise Interrupted("killed")
        self.calls.append(requests)
        if self.fail_on and any(self.fail_on in r.prompt for r in requests):
            raise ValueError(f"cannot summarise {self.fail_on}")
        out = []
        for r in requests:
            items = ITEM_LINE.findall(r.prompt)
            prev = PREVIOUS.search(r.prompt)
            text = f"saw {len(items)}: " + " | ".join(items) + (f" <- {prev.group(1)}" if prev else "")
            out.append(GenerationResult(text, len(items)))
        return out

    @property
    def prompts(self) -> list[str]:
        return [r.prompt for batch in self.calls for r in batch]


# --- fixtures -----------------------------------------------------------------------------------


def EvalTargets(**kw) -> PreferenceSettings:  # noqa: N802
    """Settings for the valid / test targets only: the SFT train targets are covered by the asset tests."""
    return PreferenceSettings(**{"train_targets": 0, **kw})


def _insert(con, table: str, frame: pd.DataFrame) -> None:
    ensure_tables(con, [table])
    con.register("_t_frame", frame)
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _t_frame")
    con.unregister("_t_frame")


def _captions(category: str, captions: dict[str, str]) -> pd.DataFrame:
    return pd.DataFrame({
        "category": category, "item_id": list(captions), "status": "ok", "reason": None,
        "caption": list(captions.values()), "modality": "text", "from_cache": False,
        "item_content_hash": "h", "cache_key": [f"k{i}" for i in range(len(captions))], "model": "m",
        "model_fingerprint": "f", "prompt_version": "p", "generation": "{}", "generated_tokens": 5,
        "clip_score": None, "clip_model": None, "image_synthetic": False,
    })


@pytest.fixture(scope="module")
def beauty_data():
    """The first 30 real Beauty users (P5 sequences, no times or ratings), their items' real titles;
    every third item has an ok caption naming its id, one more item a failed caption."""
    seq_file, titles_file = BEAUTY_DIR / "user_sequence.txt", BEAUTY_DIR / "item_titles.csv"
    seqs = read_p5_sequences(seq_file, limit_users=30)
    inter, _ = loo_frames(CAT, seqs, protocols={"1+20": 1})
    items = sorted(set(inter["item_id"]))
    titles = pd.read_csv(titles_file, dtype=str).drop_duplicates("item_id").set_index("item_id")["title"]
    raw_items = pd.DataFrame({
        "category": CAT, "item_id": items, "title": [titles.get(i) for i in items], "description": None,
        "brand": None, "categories": None, "image_url": None, "image_path": None,
        "source_file": "item_titles.csv", "source_line": range(2, len(items) + 2),
    })
    captions = {i: f"Caption of {i}: a beauty product." for i in items[::3]}
    failed_caption = _captions(CAT, {items[1]: "never used"}).assign(status="failed", reason="x", caption=None)
    return seqs, inter, raw_items, _captions(CAT, captions), failed_caption


def _beauty(con, beauty_data):
    seqs, inter, raw_items, captions, failed_caption = beauty_data
    for table, frame in (("interactions", inter), ("raw_items", raw_items), ("item_captions", captions),
                         ("item_captions", failed_caption)):
        _insert(con, table, frame)
    return seqs


def _hand(con) -> None:
    """u1: dated and rated, explicit negatives in the train and the valid window; u2: no times, no
    ratings, no metadata; u3: dated, items without metadata or with a brand only."""
    rows = []  # user, item, rating, day, label, seq_index, split
    u1 = [("A1", 5.0, 0), ("A2", 4.0, 10), ("A3", 5.0, 12), ("A4", 4.0, 30), ("A5", 5.0, 31), ("A6", 4.0, 60)]
    for s, (item, rating, day) in enumerate(u1):
        rows.append(("u1", item, rating, day, 1, s, "test" if s == 5 else "valid" if s == 4 else "train"))
    rows += [("u1", "N1", 1.0, 20, 0, None, "train"), ("u1", "N2", 2.0, 40, 0, None, "valid")]
    for s, item in enumerate(["B1", "B2", "B3", "B4", "B5"]):
        rows.append(("u2", item, None, None, 1, s, "test" if s == 4 else "valid" if s == 3 else "train"))
    for s, (item, day) in enumerate([("C1", 100), ("C2", 101), ("C3", 150), ("C4", 151)]):
        rows.append(("u3", item, 4.0, day, 1, s, "test" if s == 3 else "valid" if s == 2 else "train"))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "day", "label", "seq_index", "split"])
    inter["category"] = HAND
    inter["timestamp"] = pd.array([None if pd.isna(d) else T0 + int(d) * DAY for d in inter["day"]], dtype="Int64")
    inter["position"] = range(len(inter))
    inter["seq_index"] = inter["seq_index"].astype("Int32")
    inter["label"] = inter["label"].astype("int8")
    _insert(con, "interactions", inter.drop(columns="day"))
    meta = [  # item, title, brand, categories
        ("A1", "Rose Lipstick", "Glossier", "Beauty > Makeup > Lips > Lipstick"),
        ("A2", "Nude Lipstick", "Glossier", "Beauty > Makeup > Lips > Lipstick"),
        ("A3", "Argan Hair Oil", "Moroccanoil", "Beauty > Hair Care > Oils | Beauty > Gifts > Oils"),
        ("A4", "Lip Liner", "MAC", "Beauty > Makeup > Lips > Lip Liner"),
        ("A5", "Matte Lipstick", "MAC", "Beauty > Makeup > Lips > Lipstick"),
        ("A6", "Night Cream", "Olay", "Beauty > Skin Care > Face > Creams"),
        ("C2", None, "Acme", None),
    ]
    _insert(con, "raw_items", pd.DataFrame({
        "category": HAND, "item_id": [m[0] for m in meta], "title": [m[1] for m in meta],
        "description": None, "brand": [m[2] for m in meta], "categories": [m[3] for m in meta],
        "image_url": None, "image_path": None, "source_file": "meta", "source_line": range(1, len(meta) + 1),
    }))
    _insert(con, "item_captions", _captions(HAND, {"A3": "A  golden\nhair oil in a glass bottle."}))


def _build(con, category, gen, settings=None, identity=IDENT, **kw):
    settings = settings or EvalTargets()
    return build_user_preferences(con, category, gen, identity, settings, caption_snapshot=SNAP, run_id="r1", **kw)


def _rows(con, category) -> pd.DataFrame:
    return con.execute(
        "SELECT * FROM user_preferences WHERE category = ? ORDER BY user_id, split, mode", [category]
    ).fetch_df()


def _cache(con) -> dict[str, str]:
    return dict(con.execute("SELECT cache_key, summary FROM preference_cache").fetchall())


def _chain_prompts(chain, summaries) -> list[str]:
    return [step_request(st, summaries).prompt for st in chain.steps]


# --- structure ----------------------------------------------------------------------------------

def test_rows_blocks_and_schemas(con, beauty_data):
    seqs = _beauty(con, beauty_data)
    gen = Echo()
    stats = _build(con, CAT, gen)
    rows = _rows(con, CAT)
    assert len(rows) == stats.rows == 30 * 2 * 2 == stats.ok + stats.failed and stats.failed == 0
    assert set(map(tuple, rows[["split", "mode"]].drop_duplicates().to_numpy())) == {
        ("valid", "recurrent"), ("valid", "direct"), ("test", "recurrent"), ("test", "direct")}
    for r in rows.itertuples():
        items = seqs[r.user_id]
        target = len(items) - (2 if r.split == "valid" else 1)
        history = items[:target][-50:]
        assert r.target_seq_index == target and r.history_last_seq_index == target - 1
        assert json.loads(r.history_item_ids) == history and r.history_items == len(history)
        assert r.blocks == (math.ceil(len(history) / 3) if r.mode == "recurrent" else 1)
        assert r.caption_snapshot == SNAP and r.model == IDENT.model and r.model_fingerprint == IDENT.fingerprint
        assert r.summary.startswith("saw ") and not r.from_cache
    assert stats.rounds == rows["blocks"].max() and len(stats.round_prompts) == stats.rounds
    assert stats.generated == stats.prompts_distinct == len(gen.prompts) == len(set(gen.prompts))
    assert stats.generated == sum(stats.round_prompts)
    assert stats.generated_tokens == sum(len(ITEM_LINE.findall(p)) for p in gen.prompts)
    for table in ("user_preferences", "preference_cache"):
        outcome = validate_partition(con, table, CAT)
        assert outcome.passed, outcome.failure_cases


def test_recurrent_prompts_chain_summaries_and_direct_is_one_prompt(con, beauty_data):
    _beauty(con, beauty_data)
    gen = Echo()
    _build(con, CAT, gen)
    sent, cache = set(gen.prompts), _cache(con)
    rows = _rows(con, CAT).set_index(["user_id", "split", "mode"])
    for ch in plan_preferences(con, CAT, IDENT, EvalTargets()):
        n = len(ch.history_item_ids)
        prompts_ = _chain_prompts(ch, cache)
        assert set(prompts_) <= sent  # every prompt of the chain was really sent to the model
        row = rows.loc[(ch.user_id, ch.split, ch.mode)]
        assert row.summary == cache[ch.steps[-1].key] and row.cache_key == ch.steps[-1].key
        if ch.mode == "direct":
            assert len(ch.steps) == 1 and ch.steps[0].template is prompts.PREFERENCE_DIRECT
            assert len(ITEM_LINE.findall(prompts_[0])) == n and row.summary.startswith(f"saw {n}: ")
            continue
        assert len(ch.steps) == math.ceil(n / 3)
        assert [st.template for st in ch.steps] == [prompts.PREFERENCE_FIRST_BLOCK] + \
            [prompts.PREFERENCE_NEXT_BLOCK] * (len(ch.steps) - 1)
        for k, (st, p) in enumerate(zip(ch.steps, prompts_)):
            assert len(ITEM_LINE.findall(p)) == min(3, n - 3 * k)
            assert p.startswith(st.profile) and st.profile.startswith("User profile: ")
            if k:
                assert st.prev_key == ch.steps[k - 1].key and cache[st.prev_key] in p
        assert ch.steps[-1].profile == ch.profile == row.profile
    # every request carries the template's system turn
    assert {r.system for b in gen.calls for r in b} == {prompts.PREFERENCE_FIRST_BLOCK.system}


def test_item_lines_use_caption_else_title(con, beauty_data):
    _, _, raw_items, captions, failed_caption = beauty_data
    _beauty(con, beauty_data)
    chains = plan_preferences(con, CAT, IDENT, EvalTargets(modes=("direct",)))
    lines = "\n".join(ch.steps[0].lines for ch in chains)
    titles = raw_items.set_index("item_id")["title"]
    captioned = set(captions["item_id"])
    for iid in {i for ch in chains for i in ch.history_item_ids}:
        title = " ".join(str(titles[iid]).split())
        if iid in captioned:
            assert f"{title}: Caption of {iid}: a beauty product."[:290] in lines
        else:
            assert title[:290] in lines and "never used" not in lines  # failed captions are not used
    assert all(len(l.split(". ", 1)[1].removeprefix("(most recent) ")) <= 300 for l in lines.splitlines())


# --- leakage --------------------------------------------------------------------------------------

def test_no_summary_or_prompt_mentions_the_target_or_a_later_item(con, beauty_data):
    seqs, _, raw_items, _, _ = beauty_data
    _beauty(con, beauty_data)
    gen = Echo()
    _build(con, CAT, gen)
    cache = _cache(con)
    titles = raw_items.set_index("item_id")["title"].map(lambda t: " ".join(str(t).split()))
    summaries = _rows(con, CAT).set_index(["user_id", "split", "mode"])["summary"]
    checked = 0
    for ch in plan_preferences(con, CAT, IDENT, EvalTargets()):
        items = seqs[ch.user_id]
        text = "\n".join(_chain_prompts(ch, cache)) + "\n" + summaries[(ch.user_id, ch.split, ch.mode)]
        allowed = items[:ch.target_seq_index]
        for later in items[ch.target_seq_index:]:  # the target and every later item
            if later in allowed:
                continue
            assert later not in text, (ch.user_id, ch.split, later)
            # a title is evidence only where no history item's title contains it (real data has near-duplicates)
            if not any(titles[later] in titles[a] for a in allowed):
                assert titles[later][:100] not in text, (ch.user_id, ch.split, later)
                checked += 1
        if ch.split == "test":  # the valid target is history for the test target
            valid_target = items[ch.target_seq_index - 1]
            assert titles[valid_target][:100] in text
            assert titles[valid_target][:100] in summaries[(ch.user_id, ch.split, ch.mode)]
    assert checked > 60


def test_temporal_lines_only_with_timestamps_and_never_the_target_date(con):
    _hand(con)
    gen = Echo()
    _build(con, HAND, gen)
    cache = _cache(con)
    rows = _rows(con, HAND).set_index(["user_id", "split", "mode"])
    chains = {(c.user_id, c.split, c.mode): c for c in plan_preferences(con, HAND, IDENT, EvalTargets())}
    date = lambda day: pd.Timestamp(T0 + day * DAY, unit="s").strftime("%Y-%m-%d")  # noqa: E731

    ch = chains[("u1", "valid", "direct")]
    assert ch.temporal
    assert ch.steps[0].lines.splitlines() == [
        f"1. [{date(0)}; first in history; 30 days before the most recent] Rose Lipstick (brand: Glossier)",
        f"2. [{date(10)}; 10 days after the previous; 20 days before the most recent] Nude Lipstick (brand: Glossier)",
        f"3. [{date(12)}; 2 days after the previous; 18 days before the most recent] "
        "Argan Hair Oil: A golden hair oil in a glass bottle.",
        f"4. [{date(30)}; 18 days after the previous; most recent] Lip Liner (brand: MAC)",
    ]
    for (user, split, mode), ch in chains.items():
        text = "\n".join(_chain_prompts(ch, cache)) + rows.loc[(user, split, mode)].summary
        if user == "u2":
            assert not ch.temporal and not re.search(r"\d{4}-\d\d-\d\d|days", text)
            assert ch.steps[-1].lines.splitlines()[-1].startswith(f"{len(ch.history_item_ids)}. (most recent) ")
            continue
        assert ch.temporal
        target_day = {"u1": {"valid": 31, "test": 60}, "u3": {"valid": 150, "test": 151}}[user][split]
        assert date(target_day) not in text
        assert all(re.match(r"\d+\. \[\d{4}-\d\d-\d\d; ", l) for st in ch.steps for l in st.lines.splitlines())
    # recency is relative to the last history item, not the target: u1's test history ends on day 31
    assert "29 days before the most recent] Lip Liner" not in chains[("u1", "test", "direct")].steps[0].lines
    assert "1 day before the most recent] Lip Liner" in chains[("u1", "test", "direct")].steps[0].lines
    assert f"[{date(101)}; 1 day after the previous; most recent] (no description; brand: Acme)" in \
        chains[("u3", "valid", "direct")].steps[0].lines
    assert "(no description)" in chains[("u3", "valid", "direct")].steps[0].lines


def test_profile(con):
    _hand(con)
    chains = {(c.user_id, c.split, c.mode): c for c in plan_preferences(con, HAND, IDENT, EvalTargets())}
    p = chains[("u1", "valid", "direct")].profile
    assert p.startswith("User profile: 4 purchases over 30 days (median gap 10 days)")
    assert "favourite categories: Lipstick (2), Lip Liner (1), Oils (1)" in p
    assert "favourite brands: Glossier (2), MAC (1), Moroccanoil (1)" in p
    # ratings before the valid target: 5, 4, 5, 4 and the explicit negative of day 20 (rating 1)
    assert p.endswith("; ratings: mean 3.8 over 5 rated, 1 low-rated (disliked).")
    p = chains[("u1", "test", "recurrent")].profile
    assert p.startswith("User profile: 5 purchases over 31 days")
    # both explicit negatives precede the test target
    assert p.endswith("ratings: mean 3.7 over 7 rated, 2 low-rated (disliked).")
    # the running profile of an earlier block sees only the items (and negatives) up to that block
    steps = chains[("u1", "test", "recurrent")].steps
    assert steps[0].profile.startswith("User profile: 3 purchases over 12 days")
    assert steps[0].profile.endswith("ratings: mean 4.7 over 3 rated, 0 low-rated (disliked).")
    # no times, no ratings, no metadata: those parts are left out
    assert chains[("u2", "valid", "direct")].profile == "User profile: 3 purchases."
    assert chains[("u3", "test", "direct")].profile == (
        "User profile: 3 purchases over 50 days (median gap 25 days); favourite brands: Acme (1); "
        "ratings: mean 4.0 over 3 rated, 0 low-rated (disliked).")


def test_max_history_cuts_to_the_most_recent_items(con, beauty_data):
    seqs = _beauty(con, beauty_data)
    _build(con, CAT, Echo(), EvalTargets(max_history=4, modes=("recurrent",)))
    rows = _rows(con, CAT)
    assert (rows["history_items"] <= 4).all() and (rows["blocks"] <= 2).all()
    for r in rows.itertuples():
        assert json.loads(r.history_item_ids) == seqs[r.user_id][:r.target_seq_index][-4:]


def test_empty_history_raises_naming_the_user(con):
    inter = pd.DataFrame({
        "category": "bad", "user_id": ["ok", "ok", "ok", "broken", "broken"],
        "item_id": ["a", "b", "c", "a", "b"], "rating": None,
        "timestamp": pd.array([None] * 5, dtype="Int64"), "position": range(5),
        "label": pd.array([1] * 5, dtype="int8"),
        "seq_index": pd.array([0, 1, 2, 0, 1], dtype="Int32"), "split": ["train", "valid", "test", "valid", "test"],
    })
    _insert(con, "interactions", inter)
    with pytest.raises(ValueError, match="user 'broken'"):
        _build(con, "bad", Echo())


# --- execution order, batching, sharing -------------------------------------------------------------

def test_rounds_batch_across_users_and_the_per_user_loop_gives_identical_rows(tmp_path, beauty_data):
    settings = EvalTargets(chunk_size=16)
    a = duckdb.connect(str(tmp_path / "a.duckdb"))
    _beauty(a, beauty_data)
    batched = Echo()
    s1 = _build(a, CAT, batched, settings)
    chains = plan_preferences(a, CAT, IDENT, settings)
    cache = _cache(a)
    owner: dict[str, set[str]] = {}
    for ch in chains:
        for p in _chain_prompts(ch, cache):
            owner.setdefault(p, set()).add(ch.user_id)
    assert s1.generate_calls == len(batched.calls) == sum(math.ceil(n / 16) for n in s1.round_prompts)
    assert max(len(b) for b in batched.calls) == 16
    assert sum(len(b) > 1 for b in batched.calls) >= len(batched.calls) - s1.rounds
    first = batched.calls[0]
    assert len(set().union(*(owner[r.prompt] for r in first))) > 1  # one call carries many users' prompts
    # a round never mixes block indices: a call's prompts are all first blocks or all later blocks
    for b in batched.calls:
        assert len({"so far:" in r.prompt for r in b}) == 1

    b = duckdb.connect(str(tmp_path / "b.duckdb"))
    _beauty(b, beauty_data)
    naive = Echo()
    s2 = _build(b, CAT, naive, settings, cross_user_batching=False)
    assert all(len(c) == 1 for c in naive.calls) and len(naive.calls) == s2.generated == s1.generated
    assert s2.round_prompts == s1.round_prompts
    cols = ["user_id", "split", "mode", "status", "summary", "cache_key", "history_hash", "profile", "blocks"]
    pd.testing.assert_frame_equal(_rows(a, CAT)[cols], _rows(b, CAT)[cols])
    assert _cache(a) == _cache(b)
    # the first call of the naive order is the first block of the first user's valid chain
    assert naive.calls[0][0].prompt == _chain_prompts(chains[0], cache)[0]
    a.close()
    b.close()


def test_valid_and_test_chains_share_leading_blocks(con, beauty_data):
    _beauty(con, beauty_data)
    stats = _build(con, CAT, Echo(), EvalTargets(modes=("recurrent",)))
    planned = plan_preferences(con, CAT, IDENT, EvalTargets(modes=("recurrent",)))
    chains = {(c.user_id, c.split): c for c in planned}
    shared = 0
    for (user, split), v in chains.items():
        if split != "valid":
            continue
        t = chains[(user, "test")]
        if v.history_item_ids[0] != t.history_item_ids[0]:
            continue  # cut to max_history: the blocks' boundaries differ
        n = len(v.steps) - 1  # all but the block holding the valid history's most recent item
        assert [s.key for s in v.steps[:n]] == [s.key for s in t.steps[:n]]
        assert v.steps[-1].key != t.steps[len(v.steps) - 1].key
        shared += n
    assert shared > 30 and stats.prompts_total - stats.prompts_distinct >= shared


# --- cache, resume, failures -----------------------------------------------------------------------

def test_second_call_generates_nothing_and_marks_from_cache(con, beauty_data):
    _beauty(con, beauty_data)
    first = _build(con, CAT, Echo())
    before = _rows(con, CAT)
    gen = Echo()
    second = _build(con, CAT, gen)
    assert gen.calls == [] and second.generated == 0 and second.cached == first.prompts_distinct
    after = _rows(con, CAT)
    assert after["from_cache"].all() and not before["from_cache"].any()
    cols = ["user_id", "split", "mode", "summary", "cache_key"]
    pd.testing.assert_frame_equal(before[cols], after[cols])
    (n,) = con.execute("SELECT count(*) FROM preference_cache").fetchall()[0]
    assert n == first.prompts_distinct


@pytest.mark.parametrize("identity", [
    ModelIdentity(IDENT.model, "fp1", IDENT.generation),                               # other weights
    ModelIdentity(IDENT.model, IDENT.fingerprint, (("do_sample", False), ("max_new_tokens", 128))),
    ModelIdentity(IDENT.model, IDENT.fingerprint, (*IDENT.generation, ("quantization", "4bit"))),
])
def test_other_model_identity_regenerates(con, beauty_data, identity):
    _beauty(con, beauty_data)
    first = _build(con, CAT, Echo())
    again = _build(con, CAT, Echo(), identity=identity)
    assert again.cached == 0 and again.generated == first.prompts_distinct
    rows = _rows(con, CAT)
    assert not rows["from_cache"].any() and (rows["model_fingerprint"] == identity.fingerprint).all()


def test_same_files_under_another_name_reuse_the_cache(con, beauty_data):
    """A moved checkout or a Hub id's local copy: same fingerprint and settings, so nothing is generated again."""
    _beauty(con, beauty_data)
    first = _build(con, CAT, Echo())
    gen = Echo()
    again = _build(con, CAT, gen, identity=ModelIdentity("/moved/copy/of/echo", IDENT.fingerprint, IDENT.generation))
    assert gen.calls == [] and again.generated == 0 and again.cached == first.prompts_distinct


def test_other_prompt_version_regenerates_only_its_steps(con, beauty_data, monkeypatch):
    _beauty(con, beauty_data)
    _build(con, CAT, Echo())
    old = _rows(con, CAT)
    nxt = prompts.PREFERENCE_NEXT_BLOCK
    monkeypatch.setattr(prompts, "PREFERENCE_NEXT_BLOCK", prompts.PromptTemplate(
        name=nxt.name, revision=2, system=nxt.system, template=nxt.template.replace("Update", "Revise")))
    chains = plan_preferences(con, CAT, IDENT, EvalTargets())
    later = {st.key for ch in chains for st in ch.steps if st.prev_key is not None}
    gen = Echo()
    stats = _build(con, CAT, gen)
    assert stats.generated == len(later) > 0 and all("Revise the summary" in p for p in gen.prompts)
    new = _rows(con, CAT)
    rec, direct = new["mode"] == "recurrent", new["mode"] == "direct"
    multi = rec & (new["blocks"] > 1)
    assert (new.loc[multi, "prompt_version"] != old.loc[multi, "prompt_version"]).all()
    assert "preference_next_block/v2+" in new.loc[multi, "prompt_version"].iloc[0]
    assert new.loc[direct | (rec & (new["blocks"] == 1)), "from_cache"].all()
    assert not new.loc[multi, "from_cache"].any()


def test_killed_run_resumes_from_committed_chunks(tmp_path, beauty_data):
    settings = EvalTargets(chunk_size=8)
    con = duckdb.connect(str(tmp_path / "a.duckdb"))
    _beauty(con, beauty_data)
    with pytest.raises(Interrupted):
        _build(con, CAT, Echo(interrupt_after=3), settings)
    (n,) = con.execute("SELECT count(*) FROM preference_cache").fetchall()[0]
    assert n == 3 * 8  # three committed chunks survive the kill
    ensure_tables(con, ["user_preferences"])
    assert con.execute("SELECT count(*) FROM user_preferences").fetchall()[0][0] == 0
    gen = Echo()
    stats = _build(con, CAT, gen, settings)
    assert stats.cached == 24 and stats.generated == stats.prompts_distinct - 24 == len(gen.prompts)

    ref = duckdb.connect(str(tmp_path / "b.duckdb"))
    _beauty(ref, beauty_data)
    _build(ref, CAT, Echo(), settings)
    cols = ["user_id", "split", "mode", "status", "summary", "cache_key"]
    pd.testing.assert_frame_equal(_rows(con, CAT)[cols], _rows(ref, CAT)[cols])
    assert _cache(con) == _cache(ref)
    con.close()
    ref.close()


@pytest.mark.parametrize("cross_user_batching", [True, False])
def test_failing_requests_fail_their_chains_only(con, beauty_data, cross_user_batching):
    seqs, _, raw_items, _, _ = beauty_data
    _beauty(con, beauty_data)
    # an item in the history of a few users (not their last item): its title makes the model fail
    titles = raw_items.set_index("item_id")["title"].map(lambda t: " ".join(t.split()))
    counts = pd.Series([i for s in seqs.values() for i in s[:-2]]).value_counts()
    bad = next(i for i in counts.index[counts >= 2]
               if not any(titles[i][:60] in t for j, t in titles.items() if j != i))
    bad_title = titles[bad][:60]
    gen = Echo(fail_on=bad_title)
    stats = _build(con, CAT, gen, EvalTargets(chunk_size=16), cross_user_batching=cross_user_batching)
    rows = _rows(con, CAT)
    has_bad = rows["history_item_ids"].map(lambda h: bad in json.loads(h))
    assert has_bad.sum() >= 4 and (~has_bad).sum() > 0
    failed = rows[rows["status"] == "failed"]
    assert failed.index.equals(rows.index[has_bad])
    assert failed["summary"].isna().all() and rows.loc[~has_bad, "summary"].notna().all()
    assert failed["reason"].str.contains(f"ValueError: cannot summarise {re.escape(bad_title)}").all()
    assert failed["reason"].str.match(r"block \d+/\d+: ").all() and failed["reason"].str.len().le(300).all()
    assert stats.rows == stats.ok + stats.failed and stats.failed == len(failed)
    assert stats.prompts_distinct == stats.generated + stats.cached + stats.failed_prompts + stats.skipped_prompts
    assert stats.failed_prompts > 0
    # failures are never cached
    assert not any(bad_title in s for s in _cache(con).values())
    assert not set(failed["cache_key"]) & set(_cache(con))
    for table in ("user_preferences", "preference_cache"):
        assert validate_partition(con, table, CAT).passed
    # the next run (a working model) generates exactly what failed or was skipped
    retry = _build(con, CAT, Echo())
    assert retry.generated == stats.failed_prompts + stats.skipped_prompts and retry.failed == 0


def test_malformed_model_output_fails_only_the_request(con):
    _hand(con)

    def gen(requests):  # a wrong count for a batch; an empty text for u2's items; plain strings for u3's
        if len(requests) > 1:
            return []
        p = requests[0].prompt
        if "(no description)" in p and "Acme" not in p and "[" not in p:
            return [GenerationResult("  ", 0)]
        if "Acme" in p:
            return ["not a result"]
        return [GenerationResult("fine", 1)]

    stats = _build(con, HAND, gen, EvalTargets(chunk_size=4))
    rows = _rows(con, HAND).set_index(["user_id", "split", "mode"])
    assert (rows.loc["u1", "status"] == "ok").all() and (rows.loc["u1", "summary"] == "fine").all()
    assert rows.loc["u2", "reason"].str.endswith("ValueError: empty generation").all()
    u3 = rows.loc["u3"]
    assert (u3["status"] == "failed").all() and u3["reason"].str.contains("TypeError: generate returned a str").all()
    assert stats.ok == 4 and stats.failed == 8 and stats.rows == 12
    assert validate_partition(con, "user_preferences", HAND).passed


def test_settings_are_checked():
    for bad in (dict(block_size=0), dict(modes=()), dict(modes=("recurrent", "recurrent")), dict(modes=("x",)),
                dict(chunk_size=0), dict(max_history=0), dict(max_item_chars=5)):
        with pytest.raises(ValueError):
            EvalTargets(**bad)
    assert EvalTargets(modes=["direct"]).modes == ("direct",)
    with pytest.raises(ValueError, match="caption_snapshot"):
        build_user_preferences(None, "c", Echo(), IDENT, EvalTargets(), caption_snapshot="")
