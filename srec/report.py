"""The metric report: every model on the same candidates, with bootstrap intervals; md + json + png.

Numbers come from the stored score tables, never from a model in memory:

- sampled protocols ('1+20', '1+99'): each score source in :data:`SAMPLED_SCORE_SOURCES`
  (``baseline_scores``; later ``recommender_scores``, same columns) joined with
  ``eval_candidates`` on (category, split, protocol, user_id, slot), labels from ``is_positive``,
  through the ``evaluate`` module's ``"scores"`` config;
- full ranking: each source in :data:`FULL_RANKING_SOURCES` (``baseline_full_ranking``) through
  its ``"rank_counts"`` config.

Sources missing from the database are skipped. Intervals are percentile bootstrap over users;
all metrics of one (model, protocol) share the resamples, and so do models with the same users.
"""
from __future__ import annotations

import json
import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from srec.db import table_exists
from srec.metrics.core import DEFAULT_METRICS
from srec.tables import FULL_RANKING, PROTOCOLS_SAMPLED

log = logging.getLogger(__name__)

# Tables with the columns of baseline_scores: (category, model, split, protocol, user_id, slot, item_id, score).
SAMPLED_SCORE_SOURCES: tuple[str, ...] = ("baseline_scores", "recommender_scores")
# Tables with the columns of baseline_full_ranking: (category, model, split, user_id, item_id, n_greater, n_ties, n_negatives).
FULL_RANKING_SOURCES: tuple[str, ...] = ("baseline_full_ranking",)

PROTOCOL_ORDER: tuple[str, ...] = (*PROTOCOLS_SAMPLED, FULL_RANKING)
PROTOCOL_DESCRIPTIONS: dict[str, str] = {
    "1+20": "1 positive + 20 negatives sampled uniformly from the items the user never interacted with",
    "1+99": "1 positive + 99 negatives sampled uniformly from the items the user never interacted with",
    FULL_RANKING: "the positive ranked against every item outside the user's history",
}
REPORT_COLUMNS: tuple[str, ...] = (
    "category", "model", "split", "protocol", "metric", "value", "ci_low", "ci_high", "n_users",
)
PLOT_METRICS: tuple[str, ...] = ("HR@10", "NDCG@10")

# Bootstrap resample matrices are drawn in chunks of at most this many indices.
_BOOT_CHUNK_ELEMENTS = 4_000_000


# --------------------------------------------------------------------------- bootstrap


def bootstrap_means(values: np.ndarray, n_boot: int = 1000, seed: int = 0) -> np.ndarray:
    """Means of ``n_boot`` resamples (users drawn with replacement) of each row of ``values``.

    ``values``: [n_users] or [n_series, n_users]; every series uses the same resamples (paired).
    Returns [n_boot] or [n_series, n_boot]. The resample index matrix is drawn in chunks of
    boots so memory stays bounded; the result depends only on (n_users, n_boot, seed).
    """
    v = np.asarray(values, dtype=np.float64)
    one = v.ndim == 1
    v2 = v[None, :] if one else v
    if v2.ndim != 2:
        raise ValueError(f"values must be 1-D or 2-D, got shape {v.shape}")
    n = v2.shape[1]
    if n == 0:
        raise ValueError("cannot bootstrap zero users")
    if n_boot < 1:
        raise ValueError("n_boot must be >= 1")
    rng = np.random.default_rng(seed)
    out = np.empty((v2.shape[0], n_boot), dtype=np.float64)
    chunk = max(1, min(n_boot, _BOOT_CHUNK_ELEMENTS // n))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        idx = rng.integers(0, n, size=(b, n))
        # how often each user is drawn in each resample: [b, n]
        counts = np.bincount((idx + (np.arange(b) * n)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        out[:, start:start + b] = (v2 @ counts.T.astype(np.float64)) / n
    return out[0] if one else out


def _percentile_interval(boot_means: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    lo, hi = np.quantile(boot_means, [alpha / 2, 1 - alpha / 2], axis=-1)
    return lo, hi


def bootstrap_ci(values: np.ndarray, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of the mean of ``values`` (one value per user)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return float("nan"), float("nan")
    if np.all(v == v[0]):  # constant: every resample mean is that value (avoid summation round-off)
        return float(v[0]), float(v[0])
    lo, hi = _percentile_interval(bootstrap_means(v, n_boot, seed), alpha)
    return float(lo), float(hi)


def _intervals(
    series: list[dict[str, np.ndarray]], n_boot: int, seed: int, alpha: float
) -> list[dict[str, tuple[float, float]]]:
    """Intervals for many {metric: per-user values} dicts at once.

    Series with the same number of users share one pass of resamples (same index matrix):
    the indices depend only on (n_users, n_boot, seed), so this equals calling
    :func:`bootstrap_ci` on each series, but draws the indices once.
    """
    out: list[dict[str, tuple[float, float]]] = [{} for _ in series]
    by_n: dict[int, list[tuple[int, str]]] = {}
    for i, per_user in enumerate(series):
        for name, v in per_user.items():
            by_n.setdefault(len(v), []).append((i, name))
    for n, members in by_n.items():
        if n == 0:
            for i, name in members:
                out[i][name] = (float("nan"), float("nan"))
            continue
        mat = np.vstack([np.asarray(series[i][name], dtype=np.float64) for i, name in members])
        lo, hi = _percentile_interval(bootstrap_means(mat, n_boot, seed), alpha)
        for j, (i, name) in enumerate(members):
            row = mat[j]
            if np.all(row == row[0]):
                out[i][name] = (float(row[0]), float(row[0]))
            else:
                out[i][name] = (float(lo[j]), float(hi[j]))
    return out


# --------------------------------------------------------------------------- reading the tables




def _protocol_key(protocol: str) -> tuple[int, str]:
    return (PROTOCOL_ORDER.index(protocol) if protocol in PROTOCOL_ORDER else len(PROTOCOL_ORDER), protocol)


def _groups(keys: Sequence[np.ndarray]) -> Iterable[tuple[tuple, slice]]:
    """Consecutive runs of equal key tuples in sorted columns: (key, slice)."""
    n = len(keys[0])
    if n == 0:
        return
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    starts = np.flatnonzero(change)
    ends = np.append(starts[1:], n)
    for s, e in zip(starts, ends):
        yield tuple(k[s] for k in keys), slice(int(s), int(e))


def _remap_row_error(err: ValueError, user_ids: np.ndarray, context: str) -> ValueError:
    msg = str(err)
    m = re.search(r"\b(row|user) (\d+)", msg)
    if m is not None and int(m.group(2)) < len(user_ids):
        msg = msg.replace(m.group(0), f"user {user_ids[int(m.group(2))]!r}", 1)
    return ValueError(f"{context}: {msg}")


def _arrow(con, sql: str, params: list):
    """Run ``sql`` and return a pyarrow Table.

    Through ``execute`` (not ``con.sql``): DuckDB 2 refuses ``con.sql`` while the caller's
    connection holds an unfinished ``execute`` result (e.g. after a ``fetchone()``);
    ``execute`` does not. Its warning about one extra copy of the rows is expected here.
    """
    result = con.execute(sql, params)
    fetch = getattr(result, "to_arrow_table", None) or result.fetch_arrow_table
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Arrow output on a DB-API result")
        return fetch()


def _sampled_per_user(con, source: str, category: str, split: str, metrics, scores_metric) -> list[tuple]:
    """Per-user metrics of every (model, protocol) in ``source``, labels from eval_candidates.

    One pass over the join, one row per (model, protocol, user) with the scores and labels as
    lists in slot order, plus what the checks need. Scores must be for exactly the stored
    candidates: same item per slot, no duplicate slot, every candidate of a scored user.
    Users with no scores at all are left out (``n_users`` says how many were scored).
    """
    params = [category, split]
    table = _arrow(
        con,
        f"""
            WITH sc AS (
                SELECT s.model, s.protocol, s.user_id,
                       list(s.score ORDER BY s.slot) AS scores,
                       list(c.is_positive ORDER BY s.slot) AS labels,
                       count(*) AS n_rows,
                       count(DISTINCT s.slot) AS n_slots,
                       min(s.slot) FILTER (WHERE c.item_id IS NULL OR c.item_id <> s.item_id) AS bad_slot
                FROM {source} s
                LEFT JOIN eval_candidates c USING (category, split, protocol, user_id, slot)
                WHERE s.category = ? AND s.split = ?
                GROUP BY s.model, s.protocol, s.user_id),
            cand AS (
                SELECT protocol, user_id, count(*) AS n_cands FROM eval_candidates
                WHERE category = ? AND split = ? GROUP BY protocol, user_id)
            SELECT sc.*, coalesce(cand.n_cands, 0) AS n_cands
            FROM sc LEFT JOIN cand USING (protocol, user_id)
            ORDER BY sc.model, sc.protocol, sc.user_id
            """,
        params + params,
    )
    if table.num_rows == 0:
        return []
    model = np.asarray(table.column("model").to_pylist(), dtype=object)
    protocol = np.asarray(table.column("protocol").to_pylist(), dtype=object)
    user = np.asarray(table.column("user_id").to_pylist(), dtype=object)
    n_rows = table.column("n_rows").to_numpy()
    n_slots = table.column("n_slots").to_numpy()
    n_cands = table.column("n_cands").to_numpy()

    bad = table.column("bad_slot")
    if bad.null_count < len(bad):
        i = int(np.flatnonzero(bad.is_valid().to_numpy(zero_copy_only=False))[0])
        slot = bad[i].as_py()
        ((item, cand_item),) = con.execute(
            f"SELECT s.item_id, c.item_id FROM {source} s "
            "LEFT JOIN eval_candidates c USING (category, split, protocol, user_id, slot) "
            "WHERE s.category = ? AND s.split = ? AND s.model = ? AND s.protocol = ? AND s.user_id = ? AND s.slot = ? "
            "AND (c.item_id IS NULL OR c.item_id <> s.item_id) LIMIT 1",
            params + [model[i], protocol[i], user[i], slot],
        ).fetchall()
        what = "is not a stored candidate" if cand_item is None else f"scores item {item!r} but the candidate is {cand_item!r}"
        raise ValueError(
            f"{source}: model {model[i]!r}, protocol {protocol[i]!r}, user {user[i]!r}, slot {slot} {what} "
            f"(eval_candidates, category {category!r}, split {split!r})"
        )
    dup = np.flatnonzero(n_slots != n_rows)
    if dup.size:
        i = int(dup[0])
        raise ValueError(
            f"{source}: model {model[i]!r}, protocol {protocol[i]!r}, user {user[i]!r} has duplicate slots "
            f"({n_rows[i]} score rows for {n_slots[i]} slots)"
        )
    partial = np.flatnonzero(n_rows != n_cands)
    if partial.size:
        i = int(partial[0])
        raise ValueError(
            f"{source}: model {model[i]!r}, protocol {protocol[i]!r}, user {user[i]!r} has {n_rows[i]} "
            f"scores for {n_cands[i]} candidates"
        )

    scores_col = table.column("scores").combine_chunks()
    labels_col = table.column("labels").combine_chunks()
    offsets = scores_col.offsets.to_numpy()
    score = scores_col.values.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    label = labels_col.values.to_numpy(zero_copy_only=False).astype(np.int64)
    sizes = np.diff(offsets)
    out = []
    for (m, p), usl in _groups([model, protocol]):
        lo, hi = int(offsets[usl.start]), int(offsets[usl.stop])
        s, lab, sz = score[lo:hi], label[lo:hi], sizes[usl]
        if np.all(sz == sz[0]):  # one matrix, converted to lists once (evaluate encodes lists fastest)
            preds = s.reshape(-1, int(sz[0])).tolist()
            refs = lab.reshape(-1, int(sz[0])).tolist()
        else:
            cuts = np.cumsum(sz)[:-1]
            preds = [a.tolist() for a in np.split(s, cuts)]
            refs = [a.tolist() for a in np.split(lab, cuts)]
        try:
            res = scores_metric().compute(predictions=preds, references=refs, metrics=list(metrics), per_user=True)
        except ValueError as e:
            raise _remap_row_error(e, user[usl], f"{source} model {m!r} protocol {p!r}") from None
        out.append((str(m), str(p), {k: np.asarray(v) for k, v in res["per_user"].items()}))
    return out


def _full_ranking_per_user(con, source: str, category: str, split: str, metrics, counts_metric) -> list[tuple]:
    dup = con.execute(
        f"SELECT model, user_id, count(*) FROM {source} WHERE category = ? AND split = ? "
        "GROUP BY ALL HAVING count(*) > 1 LIMIT 1",
        [category, split],
    ).fetchall()
    if dup:
        raise ValueError(f"{source}: model {dup[0][0]!r}, user {dup[0][1]!r} appears {dup[0][2]} times")
    cols = con.execute(
        f"SELECT model, user_id, n_greater, n_ties, n_negatives FROM {source} "
        "WHERE category = ? AND split = ? ORDER BY model, user_id",
        [category, split],
    ).fetchnumpy()
    model = np.asarray(cols["model"], dtype=object)
    user = np.asarray(cols["user_id"], dtype=object)
    counts = np.stack([np.asarray(cols[c], dtype=np.int64) for c in ("n_greater", "n_ties", "n_negatives")], axis=1)
    out = []
    for (m,), sl in _groups([model]):
        try:
            res = counts_metric().compute(predictions=counts[sl].tolist(), metrics=list(metrics), per_user=True)
        except ValueError as e:
            raise _remap_row_error(e, user[sl], f"{source} model {m!r} protocol {FULL_RANKING!r}") from None
        out.append((str(m), FULL_RANKING, {k: np.asarray(v) for k, v in res["per_user"].items()}))
    return out


def compute_metric_rows(
    con,
    category: str,
    split: str = "test",
    metrics: Sequence[str] = DEFAULT_METRICS,
    n_boot: int = 1000,
    seed: int = 0,
    *,
    alpha: float = 0.05,
    sampled_sources: Sequence[str] = SAMPLED_SCORE_SOURCES,
    full_ranking_sources: Sequence[str] = FULL_RANKING_SOURCES,
) -> list[dict]:
    """One row per (model, protocol, metric): mean over users and its bootstrap interval.

    Rows carry ``REPORT_COLUMNS`` (the ``metric_report`` table's columns), sorted by protocol
    ('1+20', '1+99', 'full_ranking'), model, then the order of ``metrics``. Missing source
    tables are skipped; a model name found in two sources of the same kind is an error.
    """
    from srec.metrics import load_ranking_metrics

    metrics = tuple(metrics)
    loaded: dict[str, object] = {}

    def metric(config: str):
        def get():
            if config not in loaded:
                loaded[config] = load_ranking_metrics(config)
            return loaded[config]

        return get

    results: list[tuple] = []
    seen: dict[tuple[str, str], str] = {}

    def add(source: str, items: list[tuple]) -> None:
        for m, p, per_user in items:
            if (m, p) in seen:
                raise ValueError(f"model {m!r} protocol {p!r} appears in both {seen[(m, p)]} and {source}")
            seen[(m, p)] = source
            results.append((m, p, per_user))

    have_candidates = table_exists(con, "eval_candidates")
    for source in sampled_sources:
        if not table_exists(con, source):
            log.info("metric report: no table %s, skipped", source)
            continue
        if not have_candidates:
            log.warning("metric report: %s exists but eval_candidates does not; sampled protocols skipped", source)
            continue
        add(source, _sampled_per_user(con, source, category, split, metrics, metric("scores")))
    for source in full_ranking_sources:
        if not table_exists(con, source):
            log.info("metric report: no table %s, skipped", source)
            continue
        add(source, _full_ranking_per_user(con, source, category, split, metrics, metric("rank_counts")))

    results.sort(key=lambda r: (_protocol_key(r[1]), r[0]))
    intervals = _intervals([per_user for _, _, per_user in results], n_boot, seed, alpha)
    rows: list[dict] = []
    for (m, p, per_user), cis in zip(results, intervals):
        n_users = len(next(iter(per_user.values())))
        for name in metrics:
            lo, hi = cis[name]
            rows.append(
                {
                    "category": category,
                    "model": m,
                    "split": split,
                    "protocol": p,
                    "metric": name,
                    "value": float(np.mean(per_user[name])),
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_users": int(n_users),
                }
            )
    return rows


# Splits whose interactions come before a target of the given split (what the popularity baseline counts).
_EARLIER_SPLITS: dict[str, tuple[str, ...]] = {"valid": ("train",), "test": ("train", "valid")}


def llm_variants(con, category: str) -> list[str]:
    """The recommender variants behind the report's LLM rows (``recommender_runs``, written with the scores)."""
    if not table_exists(con, "recommender_runs"):
        return []
    return [r[0] for r in con.execute("SELECT variant FROM recommender_runs WHERE category = ? ORDER BY 1",
                                      [category]).fetchall()]


def candidate_popularity(con, category: str, split: str = "test") -> list[dict]:
    """How popular the stored positives are next to their sampled negatives, per sampled protocol.

    Counts are every user's positives in the splits before ``split`` (train for valid, train + valid for
    test), as the popularity baseline counts them. ``pairs_positive_more`` is the share of (positive,
    negative) pairs of a user in which the positive has the higher count, ties half: where it is under
    0.5, popularity ranks below chance on these candidates, and the report says why.
    """
    if split not in _EARLIER_SPLITS or not table_exists(con, "eval_candidates") \
            or not table_exists(con, "interactions"):
        return []
    earlier = _EARLIER_SPLITS[split]
    rows = con.execute(
        f"""
        WITH counts AS (
            SELECT item_id, count(*) AS n FROM interactions
            WHERE category = ? AND label = 1 AND split IN ({', '.join('?' * len(earlier))}) GROUP BY item_id),
        c AS (
            SELECT e.protocol, e.user_id, e.is_positive, coalesce(counts.n, 0) AS n
            FROM eval_candidates e LEFT JOIN counts USING (item_id)
            WHERE e.category = ? AND e.split = ?),
        pairs AS (
            SELECT p.protocol, avg(CASE WHEN p.n > q.n THEN 1.0 WHEN p.n = q.n THEN 0.5 ELSE 0.0 END) AS share
            FROM c p JOIN c q ON p.protocol = q.protocol AND p.user_id = q.user_id
            WHERE p.is_positive AND NOT q.is_positive GROUP BY p.protocol)
        SELECT protocol,
               count(*) FILTER (WHERE is_positive), count(*) FILTER (WHERE NOT is_positive),
               median(n) FILTER (WHERE is_positive), median(n) FILTER (WHERE NOT is_positive),
               avg((n <= 1)::DOUBLE) FILTER (WHERE is_positive), avg((n <= 1)::DOUBLE) FILTER (WHERE NOT is_positive),
               any_value(pairs.share)
        FROM c LEFT JOIN pairs USING (protocol) GROUP BY protocol
        """,
        [category, *earlier, category, split],
    ).fetchall()
    keys = ("protocol", "positives", "negatives", "positive_median", "negative_median",
            "positive_at_most_1", "negative_at_most_1", "pairs_positive_more")
    out = [dict(zip(keys, r)) for r in rows]
    return sorted(out, key=lambda r: _protocol_key(r["protocol"]))


def candidate_popularity_note(stats: Sequence[dict], split: str = "test") -> str | None:
    """One report line from :func:`candidate_popularity`, with the reason when positives are the less popular."""
    if not stats:
        return None
    window = " + ".join(_EARLIER_SPLITS[split])
    parts = [
        f"`{s['protocol']}`: positives median {s['positive_median']:g} ({s['positive_at_most_1']:.1%} at most 1), "
        f"negatives median {s['negative_median']:g} ({s['negative_at_most_1']:.1%} at most 1), "
        f"the positive has the higher count in {s['pairs_positive_more']:.1%} of a user's (positive, negative) pairs "
        "(ties half)"
        for s in stats if s["pairs_positive_more"] is not None
    ]
    if not parts:
        return None
    line = f"each candidate item's positives in {window} (what the popularity baseline counts): " + "; ".join(parts) + "."
    if any(s["pairs_positive_more"] is not None and s["pairs_positive_more"] < 0.5 for s in stats):
        line += (" Under 50%: the true next items have fewer earlier interactions than the sampled negatives here, so "
                 "popularity ranks below chance on these candidates. A positive's count leaves out one of its "
                 "interactions by construction (this user's held-out one), a negative's need not; where item k-core "
                 "filtering kept items with only a few interactions (a small sample), that one interaction decides.")
    return line


# --------------------------------------------------------------------------- writing the report


def _ordered(values: Iterable[str], order: Sequence[str] = ()) -> list[str]:
    seen: list[str] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    known = [v for v in order if v in seen]
    return known + [v for v in seen if v not in known]


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def format_cell(row: dict) -> str:
    return f"{row['value']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}]"


def markdown_table(rows: list[dict], protocol: str) -> str:
    """Rows = models, columns = metrics ('0.0605 [0.0570, 0.0640]'), plus the number of users."""
    sel = [r for r in rows if r["protocol"] == protocol]
    if not sel:
        return f"_No results for protocol {protocol}._"
    models = _ordered(r["model"] for r in sel)
    metrics = _ordered((r["metric"] for r in sel), DEFAULT_METRICS)
    cell = {(r["model"], r["metric"]): r for r in sel}
    lines = [
        "| model | users | " + " | ".join(metrics) + " |",
        "|---|---:|" + "---:|" * len(metrics),
    ]
    for m in models:
        n_users = next(r["n_users"] for r in sel if r["model"] == m)
        cells = [format_cell(cell[(m, x)]) if (m, x) in cell else "n/a" for x in metrics]
        lines.append(f"| {m} | {n_users} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _split_of(rows: list[dict], provenance: dict) -> str:
    splits = _ordered(str(r.get("split")) for r in rows if r.get("split") is not None)
    return provenance.get("split") or (", ".join(splits) if splits else "test")


def _first(provenance: dict, *keys: str, default=None):
    for k in keys:
        if provenance.get(k) not in (None, ""):
            return provenance[k]
    return default


def data_versions(provenance: dict) -> dict[str, str]:
    """{table: version} from ``data_versions`` (a dict) and every ``<table>_version`` key."""
    out: dict[str, str] = {}
    versions = provenance.get("data_versions")
    if isinstance(versions, dict):
        out.update({str(k): str(v) for k, v in versions.items()})
    for k, v in provenance.items():
        if k.endswith("_version") and k != "code_version" and v not in (None, ""):
            out.setdefault(k[: -len("_version")], str(v))
    return out


def data_label(category: str, provenance: dict, split: str) -> str:
    """Short 'which data' string for every JSON row, e.g. 'beauty @ interactions 3f2a1b2c, test split'."""
    if provenance.get("data"):
        return str(provenance["data"])
    versions = data_versions(provenance)
    if versions:
        ver = ", ".join(f"{k} {v[:8]}" for k, v in versions.items())
    else:
        ver = str(_first(provenance, "data_versions", "data_source", "source", default="unversioned data"))
    return f"{category} @ {ver}, {split} split"


# provenance keys the header renders itself (aliases accepted); the rest are listed as given
_PROVENANCE_KEYS = {
    "source": ("data_source", "source"),
    "date": ("date", "generated_at"),
}
_RENDERED = {"category", "data", "data_versions", "split", "candidate_protocol", "n_boot", "seed", "bootstrap",
             "data_source", "source", "date", "generated_at"}


def _header(category: str, provenance: dict, split: str, rows: list[dict]) -> str:
    n_boot = provenance.get("n_boot")
    seed = provenance.get("seed")
    if n_boot is not None:
        boot = f"n_boot = {n_boot}" + (f", seed = {seed}" if seed is not None else "")
    else:
        boot = str(provenance.get("bootstrap") or "n_boot not recorded")
    date = _first(provenance, *_PROVENANCE_KEYS["date"]) or datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    protocols = _ordered((r["protocol"] for r in rows), PROTOCOL_ORDER)
    lines = [
        f"# Metric report: {category}, {split} split",
        "",
        "## Protocol",
        "",
        "- Split: chronological leave-one-out per user (last item test, second-to-last validation, "
        f"the rest training); these numbers are on the **{split}** split.",
        f"- Candidates: {PROTOCOL_DESCRIPTIONS['1+20']} (`1+20`) and {PROTOCOL_DESCRIPTIONS['1+99']} (`1+99`); "
        "drawn once with a fixed seed and shared by every model.",
        f"- Full ranking (`full_ranking`): {PROTOCOL_DESCRIPTIONS[FULL_RANKING]} (history excluded).",
        "- Ties between the positive and negatives are broken at random, in expectation "
        "(the positive's rank is uniform over its tied block).",
        f"- Intervals: percentile bootstrap 95% CI over users ({boot}); "
        "models with the same users share the resamples.",
        "- Metrics: HR@K, NDCG@K, MRR@K (cut at K), Recall@K (= HR@K with one positive), AUC.",
        f"- Protocols in this report: {', '.join(f'`{p}`' for p in protocols) or 'none'}.",
        "",
        "## Data",
        "",
        f"- Category: {provenance.get('category', category)}",
        f"- Source: {_first(provenance, *_PROVENANCE_KEYS['source'], default='not recorded')}",
    ]
    versions = data_versions(provenance)
    if versions:
        lines.append("- Data versions:")
        lines.extend(f"  - `{k}`: `{v}`" for k, v in versions.items())
    else:
        lines.append(f"- Data versions: {provenance.get('data_versions') or 'not recorded'}")
    if provenance.get("candidate_protocol"):
        lines.append(f"- Candidate sets: {provenance['candidate_protocol']}")
    if seed is not None:
        lines.append(f"- Seed: {seed}")
    lines.append(f"- Date: {date}")
    for k, v in provenance.items():
        if k in _RENDERED or (k.endswith("_version") and k in {f"{t}_version" for t in versions}):
            continue
        lines.append(f"- {k}: {v if not isinstance(v, (dict, list)) else json.dumps(v, sort_keys=True)}")
    lines.append(f"- Every number below: `{data_label(category, provenance, split)}`")
    return "\n".join(lines)


def _write_png(rows: list[dict], path: Path, category: str, split: str, data: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = _ordered((r["protocol"] for r in rows), PROTOCOL_ORDER)
    available = _ordered(r["metric"] for r in rows)
    plot_metrics = [m for m in PLOT_METRICS if m in available] or available[:2]
    n_panels = max(1, len(protocols))
    fig, axes = plt.subplots(1, n_panels, figsize=(max(5.0, 4.2 * n_panels), 4.2), squeeze=False)
    for ax, protocol in zip(axes[0], protocols or [None]):
        if protocol is None:
            ax.text(0.5, 0.5, "no results", ha="center", va="center")
            ax.set_axis_off()
            continue
        sel = {(r["model"], r["metric"]): r for r in rows if r["protocol"] == protocol}
        models = _ordered(r["model"] for r in rows if r["protocol"] == protocol)
        x = np.arange(len(models))
        width = 0.8 / max(1, len(plot_metrics))
        for j, metric in enumerate(plot_metrics):
            vals = np.array([sel[(m, metric)]["value"] if (m, metric) in sel else np.nan for m in models])
            lo = np.array([sel[(m, metric)]["ci_low"] if (m, metric) in sel else np.nan for m in models])
            hi = np.array([sel[(m, metric)]["ci_high"] if (m, metric) in sel else np.nan for m in models])
            err = np.vstack([np.clip(vals - lo, 0, None), np.clip(hi - vals, 0, None)])
            ax.bar(x + (j - (len(plot_metrics) - 1) / 2) * width, vals, width, yerr=err, capsize=3, label=metric)
        ax.set_xticks(x)
        ax.set_xticklabels(models, rotation=30, ha="right")
        ax.set_title(f"protocol {protocol}")
        ax.set_ylim(bottom=0)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{category}, {split} split: {' and '.join(plot_metrics)} with bootstrap 95% CI")
    fig.text(0.5, 0.01, f"data: {data}", ha="center", va="bottom", fontsize=7, color="0.35")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(rows: list[dict], out_dir: Path, *, category: str, provenance: dict) -> dict[str, Path]:
    """Write metric_report.md, metric_report.json and metric_report.png into ``out_dir``; return their paths.

    ``provenance`` keys used (all optional): ``data_source`` (or ``source``), ``data_versions``
    ({table: hash}) and/or ``<table>_version`` keys, ``n_boot`` and ``seed`` (or a ``bootstrap``
    sentence), ``candidate_protocol``, ``date`` (or ``generated_at``), ``split``, ``data``
    (overrides the short per-row data string); other keys are listed in the header as given.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    split = _split_of(rows, provenance)
    data = data_label(category, provenance, split)
    rows = sorted(rows, key=lambda r: _protocol_key(r["protocol"]))  # stable: keeps model / metric order

    paths = {
        "md": out_dir / "metric_report.md",
        "json": out_dir / "metric_report.json",
        "png": out_dir / "metric_report.png",
    }

    json_rows = [{**{k: r.get(k, category if k == "category" else None) for k in REPORT_COLUMNS}, "data": data} for r in rows]
    paths["json"].write_text(json.dumps(json_rows, indent=1) + "\n", encoding="utf-8")

    parts = [_header(category, provenance, split, rows), ""]
    for protocol in _ordered((r["protocol"] for r in rows), PROTOCOL_ORDER):
        parts += [
            f"## Protocol `{protocol}`",
            "",
            f"{_capitalised(PROTOCOL_DESCRIPTIONS.get(protocol, protocol))}. Cells: mean [95% CI] over users.",
            "",
            markdown_table(rows, protocol),
            "",
        ]
    if not rows:
        parts += ["_No results: no score table had rows for this category and split._", ""]
    parts += [
        "## Caveat on sampled metrics",
        "",
        "Metrics on sampled candidates (`1+20`, `1+99`) are inflated relative to full ranking and can "
        "even reorder models (Krichene & Rendle, *On Sampled Metrics for Item Recommendation*, KDD 2020). "
        "Compare models only within one protocol, and prefer `full_ranking` where a model has it.",
        "",
    ]
    paths["md"].write_text("\n".join(parts), encoding="utf-8")

    _write_png(rows, paths["png"], category, split, data)
    return paths
