"""User preference summaries: MLLM-MSR recurrent block summaries with MLLM-SRec temporal awareness.

For every user and each target the history is the user's last ``max_history`` positives *before*
that target, oldest first. Targets: the ``valid`` and ``test`` targets, and the last ``train_targets``
training positives (split ``train``: what the recommender is fine-tuned on, see
``srec.recommender``). Per mode:

* ``recurrent`` (MLLM-MSR): the history is cut into consecutive blocks of ``block_size`` items from
  the oldest; block 1 is summarised with ``PREFERENCE_FIRST_BLOCK``, block k > 1 with
  ``PREFERENCE_NEXT_BLOCK`` carrying the summary of block k - 1. The summary is the last block's.
* ``direct`` (ablation): one ``PREFERENCE_DIRECT`` prompt over the whole history.

Item lines. One line per item: its title first (so a summary can name items), then its fused caption
(``item_captions``, status ok) or, without one, its brand; ``(no description)`` when there is nothing.
When every history item has a timestamp (MLLM-SRec temporal awareness) the line carries the date
(UTC), the gap since the previous history item and the recency (days before the most recent
*history* item; the target's time never enters a prompt). Otherwise lines carry the order only
(``1.``, ``2.`` ... and ``(most recent)`` on the last).

Profile (``USER_PROFILE``, computed, no LLM): activity (items, span and median gap when dated),
favourite categories and brands (top 3, from ``raw_items``) and rating tendency (mean rating and
count of explicit negatives, where ratings exist). Ratings count the history positives and the
user's explicit negatives (label 0) that precede the target (and, when the history was cut to
``max_history``, do not precede its first item). Every block prompt carries the profile *as of the
end of that block* (the items up to it, negatives up to its last item; the last block: up to the
target), so a prompt never depends on anything after its own items and the valid and the test
chain of a user share their leading blocks; the last block's profile is the row's ``profile``.

Caching. Step keys chain: ``key_1 = H(model, template version, profile_1, lines_1)``,
``key_k = H(model, template version, key_{k-1}, profile_k, lines_k)``; all are known before any
generation. Steps already in ``preference_cache`` are reused; the others are generated round by
round (round k = block k of every chain, deduplicated, in chunks of ``chunk_size``, one
``generate`` call per chunk) and each chunk is committed to ``preference_cache`` before the next,
so a killed run resumes from what it committed. ``cross_user_batching=False`` runs the naive order
instead (per user, split, mode and block, one request per call) with identical results.

Failures: a chunk whose ``generate`` raises is retried one request at a time; a request that still
fails (or returns an empty text) fails its chains and everything after it in them (status
``failed``, reason, summary NULL). Failures are never cached and never abort the run.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import groupby

import duckdb
import pandas as pd

import srec.prompts as _prompts
from srec.prompts import clean_text, cut_text
from srec.db import ensure_tables, partition_content_hash, replace_partition, scalar_row
from srec.models.generation import GenerateFn, GenerationRequest, GenerationResult, ModelIdentity

MODES = ("recurrent", "direct")
EVAL_SPLITS = ("valid", "test")
TARGET_SPLITS = ("train", *EVAL_SPLITS)  # 'train': the last train_targets training positives (SFT targets)
MAX_REASON_CHARS = 300
_DAY = 86_400
_NULL_TS = 9_223_372_036_854_775_807  # a NULL timestamp sorts last (srec.sequences.CHRONO_ORDER)
# Explicit negatives before each target: valid -> the 'train' window; test -> 'train' and 'valid'.
_NEG_WINDOWS = {"train": ("train",), "valid": ("train",), "test": ("train", "valid")}
_T_KEYS = "_srec_pref_keys"
_T_CHUNK = "_srec_pref_chunk"
_T_ROWS = "_srec_pref_rows"


@dataclass(frozen=True)
class PreferenceSettings:
    block_size: int = 3                 # items per recurrent block (MLLM-MSR)
    modes: tuple[str, ...] = ("recurrent", "direct")
    max_history: int = 50               # most recent items before the target
    chunk_size: int = 256               # prompts per generate call and per committed cache chunk (resume granularity)
    max_item_chars: int = 300           # an item's text in a block is cut to this
    train_targets: int = 1              # summaries for each user's last N training positives (SFT targets)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(self.modes))
        if not self.modes or any(m not in MODES for m in self.modes) or len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes must be distinct values of {MODES}, got {self.modes!r}")
        for name in ("block_size", "max_history", "chunk_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.train_targets) < 0:
            raise ValueError(f"train_targets must be >= 0, got {self.train_targets}")
        if int(self.max_item_chars) < 20:
            raise ValueError(f"max_item_chars must be >= 20, got {self.max_item_chars}")


@dataclass
class PreferenceStats:
    category: str
    rows: int = 0                # user_preferences rows written (= ok + failed)
    users: int = 0
    ok: int = 0
    failed: int = 0
    prompts_total: int = 0       # block prompts over all chains (a step shared by two chains counts twice)
    prompts_distinct: int = 0    # = generated + cached + failed_prompts + skipped_prompts
    generated: int = 0           # distinct prompts generated in this call (new LLM outputs)
    cached: int = 0              # distinct prompts reused from preference_cache
    failed_prompts: int = 0      # distinct prompts whose generation failed
    skipped_prompts: int = 0     # distinct prompts never sent: an earlier block of their chain failed
    generate_calls: int = 0      # calls to ``generate`` (retries included)
    rounds: int = 0              # most blocks in a chain
    round_prompts: list[int] = field(default_factory=list)  # distinct prompts sent per round (block index)
    generated_tokens: int = 0
    seconds: float = 0.0
    generate_seconds: float = 0.0  # inside ``generate``
    prompts_per_second: float = 0.0  # generated / seconds
    cross_user_batching: bool = True
    snapshot: str = ""           # content hash of the partition: its DataVersion (preference_snapshot)


@dataclass(frozen=True)
class PreferenceStep:
    key: str
    prev_key: str | None         # the step whose summary this prompt carries (recurrent blocks > 1)
    template: _prompts.PromptTemplate
    profile: str                 # the profile as of the end of this step's items
    lines: str                   # item lines, one per item


@dataclass
class PreferenceChain:
    """The prompts that produce one ``user_preferences`` row."""
    user_id: str
    split: str
    mode: str
    target_seq_index: int
    history_item_ids: list[str]
    history_last_seq_index: int
    temporal: bool
    profile: str
    history_hash: str
    prompt_version: str
    steps: list[PreferenceStep]


def step_request(step: PreferenceStep, summaries: Mapping[str, str]) -> GenerationRequest:
    """The request for ``step``; ``summaries`` maps step keys to generated summaries (for ``prev_key``)."""
    fields: dict[str, str] = {"profile": step.profile, "block": step.lines}
    if step.prev_key is not None:
        fields["previous_summary"] = summaries[step.prev_key]
    return GenerationRequest(prompt=step.template.render(**fields), system=step.template.system)


# --- reading the inputs ---------------------------------------------------------------------------





def _item_text(title: object, brand: object, caption: object, max_chars: int) -> str:
    name, br, cap = clean_text(title), clean_text(brand), clean_text(caption)
    if cap:
        text = f"{name}: {cap}" if name else cap
    elif name:
        text = f"{name} (brand: {br})" if br else name
    elif br:
        text = f"(no description; brand: {br})"
    else:
        text = "(no description)"
    return cut_text(text, max_chars)


def _leaf_categories(categories: object) -> tuple[str, ...]:
    """'A > B > C | D > E' -> ('C', 'E'): the most specific category of each path, distinct."""
    s = clean_text(categories)
    if not s:
        return ()
    leaves = []
    for path in s.split("|"):
        parts = [p.strip() for p in path.split(">") if p.strip()]
        if parts and parts[-1] not in leaves:
            leaves.append(parts[-1])
    return tuple(leaves)


@dataclass(frozen=True)
class _Item:
    text: str
    categories: tuple[str, ...]
    brand: str | None


@dataclass(frozen=True)
class _Pos:
    seq: int
    item_id: str
    split: str
    rating: float | None
    ts: int | None
    position: int

    @property
    def chrono(self) -> tuple:
        return (_NULL_TS if self.ts is None else self.ts, self.position, self.item_id)


def _none_if_na(values: pd.Series) -> list:
    return [None if pd.isna(v) else v for v in values.tolist()]


def _load(con: duckdb.DuckDBPyConnection, category: str, settings: PreferenceSettings):
    ensure_tables(con, ["interactions", "raw_items", "item_captions", "preference_cache"])
    # Positives from (valid target's seq_index - train_targets - max_history) on: everything any history can see.
    pos = con.execute(
        """
        SELECT user_id, item_id, seq_index, split, rating, timestamp, position
        FROM interactions WHERE category = ? AND label = 1
        QUALIFY seq_index >= min(CASE WHEN split IN ('valid', 'test') THEN seq_index END)
                             OVER (PARTITION BY user_id) - ?
        ORDER BY user_id, seq_index
        """,
        [category, int(settings.max_history) + int(settings.train_targets)],
    ).fetch_df()
    neg = con.execute(
        """
        SELECT user_id, item_id, split, rating, timestamp, position
        FROM interactions WHERE category = ? AND label = 0 AND rating IS NOT NULL
        ORDER BY user_id, timestamp NULLS LAST, position, item_id
        """,
        [category],
    ).fetch_df()
    items = con.execute(
        """
        WITH ids AS (SELECT DISTINCT item_id FROM interactions WHERE category = ? AND label = 1),
        r AS (SELECT DISTINCT ON (item_id) item_id, title, brand, categories FROM raw_items
              WHERE category = ? ORDER BY item_id, source_file, source_line),
        c AS (SELECT DISTINCT ON (item_id) item_id, caption FROM item_captions
              WHERE category = ? AND status = 'ok' AND caption IS NOT NULL ORDER BY item_id)
        SELECT ids.item_id, r.title, r.brand, r.categories, c.caption
        FROM ids LEFT JOIN r USING (item_id) LEFT JOIN c USING (item_id)
        """,
        [category, category, category],
    ).fetch_df()

    item_info = {
        iid: _Item(_item_text(t, b, c, settings.max_item_chars), _leaf_categories(cats), clean_text(b))
        for iid, t, b, cats, c in zip(items["item_id"].tolist(), items["title"].tolist(), items["brand"].tolist(),
                                      items["categories"].tolist(), items["caption"].tolist())
    }
    positives: dict[str, list[_Pos]] = {}
    rows = zip(pos["user_id"].tolist(), pos["seq_index"].astype("int64").tolist(), pos["item_id"].tolist(),
               pos["split"].tolist(), _none_if_na(pos["rating"]), _none_if_na(pos["timestamp"]),
               pos["position"].astype("int64").tolist())
    for user, group in groupby(rows, key=lambda r: r[0]):
        positives[user] = [
            _Pos(int(s), i, sp, None if r is None else float(r), None if t is None else int(t), int(p))
            for _, s, i, sp, r, t, p in group
        ]
    negatives: dict[str, list[tuple[tuple, float, str]]] = {}
    for u, iid, sp, r, t, p in zip(neg["user_id"].tolist(), neg["item_id"].tolist(), neg["split"].tolist(),
                                   neg["rating"].tolist(), _none_if_na(neg["timestamp"]),
                                   neg["position"].astype("int64").tolist()):
        negatives.setdefault(u, []).append(((_NULL_TS if t is None else int(t), int(p), iid), float(r), sp))
    return positives, negatives, item_info


# --- prompts ---------------------------------------------------------------------------------------

def _days(seconds: float) -> str:
    d = round(seconds / _DAY)
    return "1 day" if d == 1 else f"{d} days"


def _date(ts: int) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d")


def _item_lines(history: list[_Pos], items: Mapping[str, _Item], temporal: bool) -> list[str]:
    n = len(history)
    last_ts = history[-1].ts
    lines = []
    for i, h in enumerate(history):
        text = items[h.item_id].text if h.item_id in items else "(no description)"
        if temporal:
            gap = "first in history" if i == 0 else (
                "same day as the previous" if round((h.ts - history[i - 1].ts) / _DAY) == 0
                else f"{_days(h.ts - history[i - 1].ts)} after the previous")
            recency = "most recent" if i == n - 1 else f"{_days(last_ts - h.ts)} before the most recent"
            lines.append(f"{i + 1}. [{_date(h.ts)}; {gap}; {recency}] {text}")
        else:
            lines.append(f"{i + 1}. {'(most recent) ' if i == n - 1 else ''}{text}")
    return lines


def _profile(history: list[_Pos], negatives: list[tuple[tuple, float, str]], items: Mapping[str, _Item],
             temporal: bool) -> str:
    n = len(history)
    activity = f"{n} purchase{'s' if n != 1 else ''}"
    if temporal and n >= 2:
        gaps = [(b.ts - a.ts) for a, b in zip(history, history[1:])]
        activity += f" over {_days(history[-1].ts - history[0].ts)} (median gap {_days(statistics.median(gaps))})"
    cats: Counter[str] = Counter()
    brands: Counter[str] = Counter()
    for h in history:
        info = items.get(h.item_id)
        if info is not None:
            cats.update(info.categories)
            if info.brand:
                brands[info.brand] += 1

    def top(c: Counter[str]) -> str:
        return ", ".join(f"{k} ({v})" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:3])

    favourites = ""
    if cats:
        favourites += f"; favourite categories: {top(cats)}"
    if brands:
        favourites += f"; favourite brands: {top(brands)}"
    rated = [h.rating for h in history if h.rating is not None] + [r for _, r, _ in negatives]
    ratings = ""
    if rated:
        ratings = (f"; ratings: mean {sum(rated) / len(rated):.1f} over {len(rated)} rated, "
                   f"{len(negatives)} low-rated (disliked)")
    return _prompts.USER_PROFILE.render(activity=activity, favourites=favourites, ratings=ratings) + "."


def _sha(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def plan_preferences(con: duckdb.DuckDBPyConnection, category: str, identity: ModelIdentity,
                     settings: PreferenceSettings) -> list[PreferenceChain]:
    """Every chain of prompts for ``category``, ordered by user, split (train, valid, test), mode; no LLM call.

    Raises ``ValueError`` when a target has no history (a broken ``interactions`` table).
    """
    positives, negatives, items = _load(con, category, settings)
    first, nxt, direct = _prompts.PREFERENCE_FIRST_BLOCK, _prompts.PREFERENCE_NEXT_BLOCK, _prompts.PREFERENCE_DIRECT
    profile_v = _prompts.USER_PROFILE
    versions = {"recurrent": _prompts.prompt_versions(first, nxt, profile_v),
                "direct": _prompts.prompt_versions(direct, profile_v)}
    bs, mh = int(settings.block_size), int(settings.max_history)
    chains: list[PreferenceChain] = []
    for user in sorted(positives):
        rows = positives[user]
        seqs = [r.seq for r in rows]
        split_targets = []
        for split in EVAL_SPLITS:
            targets = [r for r in rows if r.split == split]
            if len(targets) > 1:
                raise ValueError(f"user {user!r} has {len(targets)} {split} targets in interactions for {category!r}")
            split_targets += [(split, t) for t in targets]
        if settings.train_targets:
            train = [r for r in rows if r.split == "train" and r.seq > 0]
            split_targets = [("train", t) for t in train[-int(settings.train_targets):]] + split_targets
        for split, target in split_targets:
            end = bisect.bisect_left(seqs, target.seq)
            history = rows[max(0, end - mh):end]
            if not history:
                raise ValueError(
                    f"user {user!r} has no history before its {split} target (seq_index {target.seq}) in "
                    f"interactions for {category!r}: the table is broken (user_k_core must be >= 3)")
            last = history[-1]
            assert last.seq < target.seq
            temporal = all(h.ts is not None for h in history)
            lower = history[0].chrono if history[0].seq > 0 else None
            negs = [g for g in negatives.get(user, ()) if g[2] in _NEG_WINDOWS[split]
                    and (lower is None or g[0] >= lower) and (split != "train" or g[0] < target.chrono)]
            lines = _item_lines(history, items, temporal)
            profile = _profile(history, negs, items, temporal)
            history_hash = _sha(json.dumps(
                [[h.item_id, items[h.item_id].text if h.item_id in items else None, h.ts] for h in history]))
            ident = identity.key
            for mode in settings.modes:
                steps: list[PreferenceStep] = []
                if mode == "direct":
                    block = "\n".join(lines)
                    steps.append(PreferenceStep(_sha(ident, direct.version, profile, block), None, direct,
                                                profile, block))
                else:
                    n_blocks = math.ceil(len(history) / bs)
                    prev: str | None = None
                    for b in range(n_blocks):
                        stop = min(len(history), (b + 1) * bs)
                        if b == n_blocks - 1:
                            block_profile = profile
                        else:  # the profile as of this block's last item
                            upto = history[stop - 1].chrono
                            block_profile = _profile(history[:stop], [g for g in negs if g[0] <= upto], items,
                                                     temporal)
                        block = "\n".join(lines[b * bs:stop])
                        tpl = first if b == 0 else nxt
                        key = (_sha(ident, tpl.version, block_profile, block) if prev is None
                               else _sha(ident, tpl.version, prev, block_profile, block))
                        steps.append(PreferenceStep(key, prev, tpl, block_profile, block))
                        prev = key
                chains.append(PreferenceChain(
                    user_id=user, split=split, mode=mode, target_seq_index=target.seq,
                    history_item_ids=[h.item_id for h in history], history_last_seq_index=last.seq,
                    temporal=temporal, profile=profile, history_hash=history_hash,
                    prompt_version=versions[mode], steps=steps,
                ))
    return chains


# --- generation -----------------------------------------------------------------------------------

def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:MAX_REASON_CHARS]


def _check_results(results: object, n: int) -> list[GenerationResult]:
    if not isinstance(results, (list, tuple)) or len(results) != n:
        got = len(results) if isinstance(results, Sequence) else type(results).__name__
        raise ValueError(f"generate returned {got} results for {n} requests")
    results = list(results)
    for r in results:
        if not isinstance(r, GenerationResult):
            raise TypeError(f"generate returned a {type(r).__name__}, not a GenerationResult")
    return results


class _Runner:
    def __init__(self, con, category: str, generate: GenerateFn, identity: ModelIdentity, run_id: str | None,
                 chunk_size: int, stats: PreferenceStats, progress: Callable[[str], None] | None):
        self.con, self.category, self.generate, self.identity = con, category, generate, identity
        self.run_id, self.chunk_size, self.stats, self.progress = run_id, chunk_size, stats, progress
        self.summaries: dict[str, str] = {}   # key -> summary (cache and this run)
        self.generated: set[str] = set()
        self.failed: dict[str, str] = {}       # key -> reason
        self.pending: list[dict] = []

    def load_cache(self, keys: list[str]) -> None:
        self.con.execute("SELECT 1").fetchall()
        self.con.register(_T_KEYS, pd.DataFrame({"cache_key": keys}))
        try:
            found = self.con.execute(
                f"SELECT c.cache_key, c.summary FROM preference_cache c JOIN {_T_KEYS} k USING (cache_key)"
            ).fetchall()
        finally:
            self.con.unregister(_T_KEYS)
        self.summaries.update(dict(found))

    def _call(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.stats.generate_calls += 1
        t0 = time.perf_counter()
        try:
            return _check_results(self.generate(requests), len(requests))
        finally:
            self.stats.generate_seconds += time.perf_counter() - t0

    def _record(self, step: PreferenceStep, outcome: GenerationResult | str) -> None:
        if isinstance(outcome, GenerationResult) and not (isinstance(outcome.text, str) and outcome.text.strip()):
            outcome = "ValueError: empty generation"
        if isinstance(outcome, str):
            self.failed[step.key] = outcome
            return
        text = outcome.text.strip()
        self.summaries[step.key] = text
        self.generated.add(step.key)
        self.stats.generated_tokens += int(outcome.generated_tokens)
        self.pending.append({
            "cache_key": step.key, "category": self.category, "summary": text,
            "generated_tokens": int(outcome.generated_tokens), "model": self.identity.model,
            "model_fingerprint": self.identity.fingerprint, "prompt_version": step.template.version,
            "run_id": self.run_id, "created_at": time.time(),
        })

    def flush(self) -> None:
        """Commit the pending summaries to preference_cache (one statement: all or nothing)."""
        if not self.pending:
            return
        frame = pd.DataFrame(self.pending)
        self.con.execute("SELECT 1").fetchall()
        self.con.register(_T_CHUNK, frame)
        try:
            self.con.execute(
                f"""
                INSERT INTO preference_cache BY NAME
                SELECT cache_key, category, summary, generated_tokens::INTEGER AS generated_tokens, model,
                       model_fingerprint, prompt_version, run_id::VARCHAR AS run_id, created_at::DOUBLE AS created_at
                FROM {_T_CHUNK} f
                WHERE NOT EXISTS (SELECT 1 FROM preference_cache c WHERE c.cache_key = f.cache_key)
                """
            )
        finally:
            self.con.unregister(_T_CHUNK)
        self.pending = []

    def run_chunk(self, steps: list[PreferenceStep]) -> None:
        requests = [step_request(s, self.summaries) for s in steps]
        try:
            outcomes: list[GenerationResult | str] = list(self._call(requests))
        except Exception:  # noqa: BLE001 -- retried one by one; a BaseException (interrupt) propagates
            outcomes = []
            for req in requests:
                try:
                    outcomes.append(self._call([req])[0])
                except Exception as e:  # noqa: BLE001
                    outcomes.append(_reason(e))
        for step, outcome in zip(steps, outcomes):
            self._record(step, outcome)
        self.flush()

    def run_one(self, step: PreferenceStep) -> None:
        try:
            outcome: GenerationResult | str = self._call([step_request(step, self.summaries)])[0]
        except Exception as e:  # noqa: BLE001
            outcome = _reason(e)
        self._record(step, outcome)
        if len(self.pending) >= self.chunk_size:
            self.flush()

    def say(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)


def _run_batched(runner: _Runner, chains: list[PreferenceChain], rounds: int, chunk_size: int) -> None:
    for r in range(rounds):
        todo: list[PreferenceStep] = []
        seen: set[str] = set()
        for ch in chains:
            if len(ch.steps) <= r:
                continue
            st = ch.steps[r]
            if st.key in seen or st.key in runner.summaries or st.key in runner.failed:
                continue
            if st.prev_key is not None and st.prev_key not in runner.summaries:
                continue  # an earlier block failed
            seen.add(st.key)
            todo.append(st)
        runner.stats.round_prompts[r] = len(todo)
        n_chunks = math.ceil(len(todo) / chunk_size)
        for c in range(n_chunks):
            runner.say(f"preferences {runner.category}: round {r + 1}/{rounds}, chunk {c + 1}/{n_chunks} "
                       f"({len(todo)} prompts this round)")
            runner.run_chunk(todo[c * chunk_size:(c + 1) * chunk_size])


def _run_per_user(runner: _Runner, chains: list[PreferenceChain]) -> None:
    try:
        last_user = None
        for ch in chains:
            if ch.user_id != last_user:
                last_user = ch.user_id
                runner.say(f"preferences {runner.category}: user {ch.user_id}")
            for r, st in enumerate(ch.steps):
                if st.key in runner.summaries:
                    continue
                if st.key in runner.failed:
                    break
                runner.stats.round_prompts[r] += 1
                runner.run_one(st)
                if st.key in runner.failed:
                    break
    finally:
        runner.flush()


def build_user_preferences(
    con: duckdb.DuckDBPyConnection,
    category: str,
    generate: GenerateFn,
    identity: ModelIdentity,
    settings: PreferenceSettings,
    *,
    caption_snapshot: str,
    run_id: str | None = None,
    cross_user_batching: bool = True,
    progress: Callable[[str], None] | None = None,
) -> PreferenceStats:
    """Write ``category``'s ``user_preferences`` partition (one row per user x target x mode).

    Generated steps go to ``preference_cache`` chunk by chunk as they are produced; the partition is
    replaced in one transaction at the end. See the module docstring for prompts, keys and failures.
    """
    if not caption_snapshot:
        raise ValueError("caption_snapshot (the DataVersion of item_captions the prompts use) is required")
    t0 = time.perf_counter()
    stats = PreferenceStats(category=category, cross_user_batching=cross_user_batching)
    chains = plan_preferences(con, category, identity, settings)
    if not chains:
        raise ValueError(f"no valid/test targets in interactions for category {category!r}")
    stats.rounds = max(len(ch.steps) for ch in chains)
    stats.round_prompts = [0] * stats.rounds
    stats.prompts_total = sum(len(ch.steps) for ch in chains)
    keys = list(dict.fromkeys(st.key for ch in chains for st in ch.steps))
    stats.prompts_distinct = len(keys)

    runner = _Runner(con, category, generate, identity, run_id, int(settings.chunk_size), stats, progress)
    runner.load_cache(keys)
    stats.cached = len(runner.summaries)
    if cross_user_batching:
        _run_batched(runner, chains, stats.rounds, int(settings.chunk_size))
    else:
        _run_per_user(runner, chains)
    stats.generated = len(runner.generated)
    stats.failed_prompts = len(runner.failed)
    stats.skipped_prompts = stats.prompts_distinct - stats.generated - stats.cached - stats.failed_prompts

    records = []
    for ch in chains:
        n = len(ch.steps)
        reason = None
        for i, st in enumerate(ch.steps):
            if st.key not in runner.summaries:
                why = runner.failed.get(st.key, "not generated")
                reason = f"block {i + 1}/{n}: {why}"[:MAX_REASON_CHARS]
                break
        ok = reason is None
        records.append({
            "category": category, "user_id": ch.user_id, "split": ch.split, "mode": ch.mode,
            "target_seq_index": ch.target_seq_index, "history_items": len(ch.history_item_ids),
            "history_last_seq_index": ch.history_last_seq_index,
            "history_item_ids": json.dumps(ch.history_item_ids), "blocks": n,
            "status": "ok" if ok else "failed", "reason": reason,
            "summary": runner.summaries[ch.steps[-1].key] if ok else None,
            "profile": ch.profile, "history_hash": ch.history_hash, "cache_key": ch.steps[-1].key,
            "from_cache": ok and not any(st.key in runner.generated for st in ch.steps),
            "model": identity.model, "model_fingerprint": identity.fingerprint,
            "prompt_version": ch.prompt_version, "caption_snapshot": caption_snapshot,
        })
    frame = pd.DataFrame(records)
    con.execute("SELECT 1").fetchall()
    con.register(_T_ROWS, frame)
    try:
        stats.rows = replace_partition(
            con, "user_preferences", category,
            f"""
            SELECT category, user_id, split, mode, target_seq_index::INTEGER AS target_seq_index,
                   history_items::INTEGER AS history_items,
                   history_last_seq_index::INTEGER AS history_last_seq_index, history_item_ids,
                   blocks::INTEGER AS blocks, status, reason::VARCHAR AS reason, summary::VARCHAR AS summary,
                   profile, history_hash, cache_key, from_cache::BOOLEAN AS from_cache, model,
                   model_fingerprint, prompt_version, caption_snapshot
            FROM {_T_ROWS}
            """,
        )
    finally:
        con.unregister(_T_ROWS)
    stats.users = int(frame["user_id"].nunique())
    stats.ok = int((frame["status"] == "ok").sum())
    stats.failed = int((frame["status"] == "failed").sum())
    if stats.rows != len(frame) or stats.rows != stats.ok + stats.failed:
        raise AssertionError(f"user_preferences for {category!r}: wrote {stats.rows} rows for {len(frame)} chains "
                             f"(ok {stats.ok}, failed {stats.failed})")
    stats.snapshot = preference_snapshot(con, category)
    record_preference_snapshot(con, category, stats.snapshot, run_id)
    stats.seconds = time.perf_counter() - t0
    stats.prompts_per_second = stats.generated / stats.seconds if stats.seconds > 0 else 0.0
    return stats


# --- snapshots (lineage) --------------------------------------------------------------------------

# What a row says (not how it was produced, e.g. from_cache): the columns the snapshot id hashes.
PREFERENCE_CONTENT_COLUMNS = ("user_id", "split", "mode", "cache_key", "summary", "status", "profile")


def preference_snapshot(con: duckdb.DuckDBPyConnection, category: str) -> str:
    """Content hash of the category's preference summaries: the snapshot id (and DataVersion) lineage refers to."""
    return partition_content_hash(con, "user_preferences", category, PREFERENCE_CONTENT_COLUMNS)


def record_preference_snapshot(con: duckdb.DuckDBPyConnection, category: str, snapshot: str | None = None,
                               run_id: str | None = None) -> int:
    """Append the partition's rows (which summary, by ``cache_key``, each user x split x mode x target had) to
    ``preference_snapshots`` under ``snapshot`` unless it is recorded already; returns the rows added."""
    ensure_tables(con, ["preference_snapshots"])
    snapshot = snapshot or preference_snapshot(con, category)
    count_sql = "SELECT count(*) FROM preference_snapshots WHERE category = ? AND snapshot = ?"
    if scalar_row(con, count_sql, [category, snapshot])[0]:
        return 0
    con.execute(
        """
        INSERT INTO preference_snapshots BY NAME
        SELECT category, ?::VARCHAR AS snapshot, user_id, split, mode, target_seq_index, cache_key, status, model,
               model_fingerprint, prompt_version, caption_snapshot, ?::VARCHAR AS run_id, ?::DOUBLE AS recorded_at
        FROM user_preferences WHERE category = ?
        """,
        [snapshot, run_id, time.time(), category],
    )
    return int(scalar_row(con, count_sql, [category, snapshot])[0])
