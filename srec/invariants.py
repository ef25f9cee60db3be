"""Cross-table invariants of the data pipeline, each one SQL over a category's rows.

Every function returns an ``InvariantOutcome``: ``passed`` (no violations), a one-line
``description`` of what was checked (and what failed), ``n_violations`` and up to 20 example rows.
A violation row always has a ``problem`` column saying which part of the invariant it breaks.
"""
from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pandas as pd

from srec.tables import PROTOCOLS_SAMPLED

MAX_EXAMPLES = 20


@dataclass
class InvariantOutcome:
    passed: bool
    description: str
    n_violations: int
    examples: pd.DataFrame  # at most MAX_EXAMPLES rows


def _missing_tables(con: duckdb.DuckDBPyConnection, tables: list[str]) -> list[str]:
    present = {
        r[0]
        for r in con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        ).fetchall()
    }
    return [t for t in tables if t not in present]


def _run(
    con: duckdb.DuckDBPyConnection,
    description: str,
    tables: list[str],
    violations_sql: str,
    params: list,
) -> InvariantOutcome:
    """Count and sample the rows of ``violations_sql`` (which must have a ``problem`` column)."""
    missing = _missing_tables(con, tables)
    if missing:
        examples = pd.DataFrame({"problem": [f"table {t} does not exist" for t in missing]})
        return InvariantOutcome(False, f"{description} -- missing tables: {', '.join(missing)}", len(missing), examples)
    con.execute(f"CREATE OR REPLACE TEMP TABLE _srec_inv_violations AS {violations_sql}", params)
    try:
        (n,) = con.execute("SELECT count(*) FROM _srec_inv_violations").fetchall()[0]
        examples = con.execute(f"SELECT * FROM _srec_inv_violations LIMIT {MAX_EXAMPLES}").fetch_df()
        by_problem = con.execute(
            "SELECT problem, count(*) FROM _srec_inv_violations GROUP BY problem ORDER BY 2 DESC, 1"
        ).fetchall()
    finally:
        con.execute("DROP TABLE IF EXISTS _srec_inv_violations")
    n = int(n)
    if n:
        description = f"{description} -- {n} violation(s): " + "; ".join(f"{p} ({c})" for p, c in by_problem)
    return InvariantOutcome(n == 0, description, n, examples)


def targets_not_in_history(con: duckdb.DuckDBPyConnection, category: str) -> InvariantOutcome:
    """No valid/test target is among the user's earlier items, and the history precedes its target.

    A valid target must not appear in the user's train rows; a test target neither in train nor in
    valid rows (so it differs from the valid target); every train positive precedes the valid
    target and the valid target precedes the test target (``seq_index``).
    """
    sql = """
    WITH i AS (SELECT rowid AS rid, * FROM interactions WHERE category = $1),
    t AS (SELECT * FROM i WHERE label = 1 AND split IN ('valid', 'test'))
    SELECT t.user_id, t.split AS target_split, t.item_id, h.split AS seen_in_split, h.label AS seen_label,
           'target item already in the user''s earlier rows' AS problem
    FROM t JOIN i h ON h.user_id = t.user_id AND h.item_id = t.item_id AND h.rid <> t.rid
    WHERE h.split = 'train' OR (t.split = 'test' AND h.split = 'valid')
    UNION ALL
    SELECT t.user_id, t.split, t.item_id, h.split, h.label,
           'earlier-split positive at or after the target in the sequence (seq_index ' || h.seq_index
           || ' >= ' || t.seq_index || ')'
    FROM t JOIN i h ON h.user_id = t.user_id AND h.label = 1 AND h.rid <> t.rid
    WHERE (h.split = 'train' OR (t.split = 'test' AND h.split = 'valid')) AND h.seq_index >= t.seq_index
    """
    return _run(
        con,
        f"[{category}] valid/test targets are not in the user's history and come after it",
        ["interactions"], sql, [category],
    )


def one_positive_per_candidate_set(
    con: duckdb.DuckDBPyConnection, category: str, negatives: dict[str, int] = PROTOCOLS_SAMPLED
) -> InvariantOutcome:
    """Every candidate set has one positive (the user's target, at slot 0) and k distinct never-seen negatives.

    Per (user, split, protocol): exactly one ``is_positive`` row, at slot 0, equal to the user's
    target in interactions for that split; 1 + k rows with slots 0..k; distinct items; no negative
    the user ever interacted with (any row of the user in interactions).
    """
    if _missing_tables(con, ["eval_candidates", "interactions"]):
        return _run(con, f"[{category}] candidate sets", ["eval_candidates", "interactions"], "", [])
    proto_values = ", ".join(f"('{p}', {int(k)})" for p, k in negatives.items())
    # Distinct slots per set without a per-group DISTINCT (the expensive part on millions of rows):
    # a bit set of the slots, when every slot fits in a HUGEINT.
    if max(negatives.values()) <= 126:
        n_slots = "bit_count(bit_or(1::HUGEINT << c.slot::HUGEINT) FILTER (WHERE c.slot BETWEEN 0 AND 126))"
    else:
        n_slots = "count(DISTINCT c.slot)"
    # Repeated items within a set: distinct hashes rule them out cheaply; list them exactly only if needed.
    (n_hash_dup,) = con.execute(
        "SELECT count(*) FROM (SELECT hash(user_id, split, protocol, item_id) AS h FROM eval_candidates "
        "WHERE category = $1 GROUP BY h HAVING count(*) > 1)",
        [category],
    ).fetchall()[0]
    dup_items = ""
    if n_hash_dup:
        dup_items = """
    UNION ALL
    SELECT user_id, split, protocol, NULL::INTEGER, item_id, 'item repeated ' || count(*) || ' times in set'
    FROM c GROUP BY user_id, split, protocol, item_id HAVING count(*) > 1"""
    sql = f"""
    WITH c AS (SELECT * FROM eval_candidates WHERE category = $1),
    p(protocol, k) AS (VALUES {proto_values}),
    tgt AS (
        SELECT user_id, split, min(item_id) AS target_item_id, count(*) AS n_targets
        FROM interactions WHERE category = $1 AND label = 1 AND split IN ('valid', 'test')
        GROUP BY user_id, split
    ),
    s AS (
        SELECT c.user_id, c.split, c.protocol,
               count(*) AS n_rows,
               count(*) FILTER (WHERE c.is_positive) AS n_pos,
               min(c.slot) FILTER (WHERE c.is_positive) AS pos_slot,
               min(c.item_id) FILTER (WHERE c.is_positive) AS pos_item,
               {n_slots} AS n_slots, min(c.slot) AS min_slot, max(c.slot) AS max_slot
        FROM c GROUP BY c.user_id, c.split, c.protocol
    ),
    chk AS (
        SELECT s.*, p.k, tgt.target_item_id, tgt.n_targets,
            CASE
                WHEN p.k IS NULL THEN 'unknown protocol'
                WHEN s.n_pos <> 1 THEN 'set has ' || s.n_pos || ' positives'
                WHEN s.pos_slot <> 0 THEN 'positive at slot ' || s.pos_slot
                WHEN tgt.target_item_id IS NULL THEN 'user has no ' || s.split || ' target in interactions'
                WHEN tgt.n_targets <> 1 THEN 'user has ' || tgt.n_targets || ' ' || s.split || ' targets'
                WHEN s.pos_item <> tgt.target_item_id THEN 'positive is not the user''s ' || s.split || ' target'
                WHEN s.n_rows <> 1 + p.k THEN 'set has ' || s.n_rows || ' rows, expected ' || (1 + p.k)
                WHEN s.n_slots <> s.n_rows OR s.min_slot <> 0 OR s.max_slot <> p.k THEN 'slots are not 0..' || p.k
            END AS problem
        FROM s LEFT JOIN p USING (protocol) LEFT JOIN tgt USING (user_id, split)
    )
    SELECT user_id, split, protocol, NULL::INTEGER AS slot, pos_item AS item_id, problem FROM chk WHERE problem IS NOT NULL
    UNION ALL
    SELECT c.user_id, c.split, c.protocol, c.slot, c.item_id, 'negative the user interacted with (' || i.split || ')'
    FROM c JOIN interactions i ON i.category = $1 AND i.user_id = c.user_id AND i.item_id = c.item_id
    WHERE NOT c.is_positive{dup_items}
    """
    return _run(
        con,
        f"[{category}] every candidate set has one positive (its target, slot 0), 1+k rows, distinct never-interacted negatives",
        ["eval_candidates", "interactions"], sql, [category],
    )


def eval_users_have_history(
    con: duckdb.DuckDBPyConnection, category: str, negatives: dict[str, int] = PROTOCOLS_SAMPLED
) -> InvariantOutcome:
    """Every evaluated user has train history, one valid and one test target, and all candidate sets.

    Every user with a candidate set has >= 1 train positive; every user in interactions has
    exactly one valid and one test positive and a candidate set for each split and protocol.
    """
    protos = ", ".join(f"('{p}')" for p in negatives)
    sql = f"""
    WITH i AS (SELECT * FROM interactions WHERE category = $1),
    u AS (
        SELECT user_id,
               count(*) FILTER (WHERE label = 1 AND split = 'train') AS n_train,
               count(*) FILTER (WHERE label = 1 AND split = 'valid') AS n_valid,
               count(*) FILTER (WHERE label = 1 AND split = 'test') AS n_test
        FROM i GROUP BY user_id
    ),
    cs AS (SELECT DISTINCT user_id, split, protocol FROM eval_candidates WHERE category = $1),
    need AS (
        SELECT u.user_id, sp.split, pr.protocol
        FROM u, (VALUES ('valid'), ('test')) sp(split), (VALUES {protos}) pr(protocol)
    )
    SELECT cu.user_id, NULL AS split, NULL AS protocol,
           'user with a candidate set has ' || coalesce(u.n_train, 0) || ' train positives' AS problem
    FROM (SELECT DISTINCT user_id FROM cs) cu LEFT JOIN u USING (user_id)
    WHERE coalesce(u.n_train, 0) < 1
    UNION ALL
    SELECT user_id, 'valid', NULL, 'user has ' || n_valid || ' valid positives' FROM u WHERE n_valid <> 1
    UNION ALL
    SELECT user_id, 'test', NULL, 'user has ' || n_test || ' test positives' FROM u WHERE n_test <> 1
    UNION ALL
    SELECT need.user_id, need.split, need.protocol, 'no candidate set'
    FROM need ANTI JOIN cs USING (user_id, split, protocol)
    """
    return _run(
        con,
        f"[{category}] every user has train history, one valid and one test target, and every candidate set",
        ["interactions", "eval_candidates"], sql, [category],
    )


def interactions_reconcile(con: duckdb.DuckDBPyConnection, category: str) -> InvariantOutcome:
    """The interactions funnel accounts for every row from raw_reviews to interactions.

    rows_out = rows_in - dropped at each step, each step's rows_in is the previous rows_out, the
    first rows_in is the raw_reviews count and the last rows_out the interactions count.
    """
    sql = """
    WITH f AS (
        SELECT *, lag(rows_out) OVER (ORDER BY step_order) AS prev_out,
               row_number() OVER (ORDER BY step_order) AS rn, count(*) OVER () AS n_steps
        FROM interactions_funnel WHERE category = $1
    ),
    counts AS (
        SELECT (SELECT count(*) FROM raw_reviews WHERE category = $1) AS n_raw,
               (SELECT count(*) FROM interactions WHERE category = $1) AS n_inter
    )
    SELECT step_order, step, rows_in, dropped, rows_out, 'rows_out <> rows_in - dropped' AS problem
    FROM f WHERE rows_out <> rows_in - dropped
    UNION ALL
    SELECT step_order, step, rows_in, dropped, rows_out, 'negative dropped' FROM f WHERE dropped < 0
    UNION ALL
    SELECT step_order, step, rows_in, dropped, rows_out, 'rows_in <> previous step rows_out (' || prev_out || ')'
    FROM f WHERE prev_out IS NOT NULL AND rows_in <> prev_out
    UNION ALL
    SELECT step_order, step, rows_in, dropped, rows_out, 'first rows_in <> raw_reviews count (' || n_raw || ')'
    FROM f, counts WHERE rn = 1 AND rows_in <> n_raw
    UNION ALL
    SELECT step_order, step, rows_in, dropped, rows_out, 'last rows_out <> interactions count (' || n_inter || ')'
    FROM f, counts WHERE rn = n_steps AND rows_out <> n_inter
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, 'no funnel rows for the category'
    WHERE NOT EXISTS (SELECT 1 FROM f)
    """
    return _run(
        con,
        f"[{category}] the interactions funnel reconciles raw_reviews to interactions",
        ["interactions_funnel", "raw_reviews", "interactions"], sql, [category],
    )


def ingest_reconciles(con: duckdb.DuckDBPyConnection, category: str) -> InvariantOutcome:
    """Ingest counts reconcile: read = kept + quarantined, and the log matches the stored rows.

    Per ingest_log row rows_read = rows_kept + rows_quarantined; per table_name the kept sum
    equals the rows in raw_reviews/raw_items and the quarantined sum the ingest_quarantine rows.
    """
    sql = """
    WITH l AS (SELECT * FROM ingest_log WHERE category = $1),
    actual AS (
        SELECT 'raw_reviews' AS table_name,
               (SELECT count(*) FROM raw_reviews WHERE category = $1) AS n_kept,
               (SELECT count(*) FROM ingest_quarantine WHERE category = $1 AND table_name = 'raw_reviews') AS n_quar
        UNION ALL
        SELECT 'raw_items',
               (SELECT count(*) FROM raw_items WHERE category = $1),
               (SELECT count(*) FROM ingest_quarantine WHERE category = $1 AND table_name = 'raw_items')
    ),
    logged AS (
        SELECT table_name, sum(rows_kept) AS kept, sum(rows_quarantined) AS quar, count(*) AS n_files
        FROM l GROUP BY table_name
    )
    SELECT table_name, source_file, rows_read, rows_kept, rows_quarantined,
           'rows_read <> rows_kept + rows_quarantined' AS problem
    FROM l WHERE rows_read <> rows_kept + rows_quarantined
    UNION ALL
    SELECT a.table_name, NULL, NULL, coalesce(g.kept, 0), NULL,
           'logged rows_kept ' || coalesce(g.kept, 0) || ' <> ' || a.table_name || ' rows ' || a.n_kept
    FROM actual a LEFT JOIN logged g USING (table_name) WHERE coalesce(g.kept, 0) <> a.n_kept
    UNION ALL
    SELECT a.table_name, NULL, NULL, NULL, coalesce(g.quar, 0),
           'logged rows_quarantined ' || coalesce(g.quar, 0) || ' <> ingest_quarantine rows ' || a.n_quar
    FROM actual a LEFT JOIN logged g USING (table_name) WHERE coalesce(g.quar, 0) <> a.n_quar
    UNION ALL
    SELECT table_name, source_file, rows_read, rows_kept, rows_quarantined, 'unknown table_name in ingest_log'
    FROM l WHERE table_name NOT IN ('raw_reviews', 'raw_items')
    UNION ALL
    SELECT NULL, NULL, NULL, NULL, NULL, 'no ingest_log rows for the category'
    WHERE NOT EXISTS (SELECT 1 FROM l)
    """
    return _run(
        con,
        f"[{category}] ingest_log reconciles: read = kept + quarantined, and matches the stored rows",
        ["ingest_log", "raw_reviews", "raw_items", "ingest_quarantine"], sql, [category],
    )


def item_images_cover_items(con: duckdb.DuckDBPyConnection, category: str) -> InvariantOutcome:
    """Every item in interactions has exactly one item_images row and no other item has one."""
    sql = """
        WITH items AS (SELECT DISTINCT item_id FROM interactions WHERE category = ?),
             imgs AS (SELECT item_id FROM item_images WHERE category = ?)
        SELECT i.item_id, 'item in interactions has no item_images row' AS problem
        FROM items i ANTI JOIN imgs g ON g.item_id = i.item_id
        UNION ALL
        SELECT g.item_id, 'item_images row for an item not in interactions' AS problem
        FROM imgs g ANTI JOIN items i ON g.item_id = i.item_id
    """
    return _run(con, "item_images covers exactly the items in interactions", ["interactions", "item_images"],
                sql, [category, category])


def captions_cover_items(con: duckdb.DuckDBPyConnection, category: str) -> InvariantOutcome:
    """Every item of item_images has one caption row, and its modality matches its image status."""
    sql = """
        SELECT g.item_id, 'item has no caption row' AS problem
        FROM item_images g ANTI JOIN item_captions c ON c.category = g.category AND c.item_id = g.item_id
        WHERE g.category = ?
        UNION ALL
        SELECT c.item_id, 'caption row for an item without an item_images row' AS problem
        FROM item_captions c ANTI JOIN item_images g ON c.category = g.category AND c.item_id = g.item_id
        WHERE c.category = ?
        UNION ALL
        SELECT c.item_id, 'modality does not match the image status (' || g.status || ')' AS problem
        FROM item_captions c JOIN item_images g ON c.category = g.category AND c.item_id = g.item_id
        WHERE c.category = ? AND (c.modality = 'image+text') <> (g.status = 'ok')
    """
    return _run(con, "one caption per item, image+text exactly when the image is ok", ["item_images", "item_captions"],
                sql, [category, category, category])


def preferences_use_only_past(con: duckdb.DuckDBPyConnection, category: str) -> InvariantOutcome:
    """Each summary's target is a real positive of its split (the valid/test target, or a training positive)
    and every item it saw came before it."""
    sql = """
        WITH p AS (SELECT * FROM user_preferences WHERE category = ?),
             t AS (SELECT user_id, split, seq_index FROM interactions WHERE category = ? AND label = 1),
             h AS (SELECT p.user_id, p.split, p.mode, p.target_seq_index,
                          unnest(json_extract_string(p.history_item_ids, '$[*]')) AS item_id FROM p)
        SELECT p.user_id, p.split, p.mode, 'target_seq_index is not the split target' AS problem
        FROM p LEFT JOIN t ON t.user_id = p.user_id AND t.split = p.split AND t.seq_index = p.target_seq_index
        WHERE t.seq_index IS NULL
        UNION ALL
        SELECT h.user_id, h.split, h.mode, 'history item ' || h.item_id || ' is not before the target' AS problem
        FROM h LEFT JOIN interactions i
          ON i.category = ? AND i.user_id = h.user_id AND i.item_id = h.item_id AND i.label = 1
        WHERE i.seq_index IS NULL OR i.seq_index >= h.target_seq_index
    """
    return _run(con, "summaries use only interactions before their target", ["interactions", "user_preferences"],
                sql, [category, category, category])


def sft_examples_are_sound(con: duckdb.DuckDBPyConnection, category: str) -> InvariantOutcome:
    """Every SFT target is a training positive whose example says Yes.; every negative is an item the user never
    interacted with (or rated low in training); each target has one positive per style."""
    sql = """
        WITH e AS (SELECT * FROM sft_examples WHERE category = ?),
             i AS (SELECT * FROM interactions WHERE category = ?)
        SELECT e.user_id, e.style, e.item_id, 'positive is not the train positive at target_seq_index' AS problem
        FROM e LEFT JOIN i ON i.user_id = e.user_id AND i.seq_index = e.target_seq_index AND i.label = 1
        WHERE e.label = 1 AND (i.item_id IS DISTINCT FROM e.item_id OR i.split <> 'train')
        UNION ALL
        SELECT e.user_id, e.style, e.item_id, 'sampled negative is an item the user interacted with' AS problem
        FROM e JOIN i ON i.user_id = e.user_id AND i.item_id = e.item_id
        WHERE e.label_source = 'sampled'
        UNION ALL
        SELECT e.user_id, e.style, e.item_id, 'low-rating negative is not a low-rated training item' AS problem
        FROM e LEFT JOIN i ON i.user_id = e.user_id AND i.item_id = e.item_id AND i.label = 0 AND i.split = 'train'
        WHERE e.label_source = 'low_rating' AND i.item_id IS NULL
        UNION ALL
        SELECT user_id, style, NULL, 'target has ' || count(*) FILTER (WHERE label = 1) || ' positives' AS problem
        FROM e GROUP BY user_id, style, target_seq_index HAVING count(*) FILTER (WHERE label = 1) <> 1
    """
    return _run(con, "SFT examples: real training positives, unseen or low-rated negatives",
                ["interactions", "sft_examples"], sql, [category, category])


def recommender_scores_cover_candidates(con: duckdb.DuckDBPyConnection, category: str) -> InvariantOutcome:
    """Each recommender model scored every stored candidate of every user of its protocols, and nothing else."""
    sql = """
        WITH s AS (SELECT * FROM recommender_scores WHERE category = ?),
             c AS (SELECT * FROM eval_candidates WHERE category = ?),
             mp AS (SELECT DISTINCT model, split, protocol FROM s)
        SELECT mp.model, c.user_id, c.slot, 'candidate not scored' AS problem
        FROM mp JOIN c ON c.split = mp.split AND c.protocol = mp.protocol
        LEFT JOIN s ON s.model = mp.model AND s.split = c.split AND s.protocol = c.protocol
             AND s.user_id = c.user_id AND s.slot = c.slot
        WHERE s.item_id IS DISTINCT FROM c.item_id
        UNION ALL
        SELECT s.model, s.user_id, s.slot, 'score for a slot that is not a stored candidate' AS problem
        FROM s LEFT JOIN c USING (split, protocol, user_id, slot)
        WHERE c.item_id IS NULL
    """
    return _run(con, "recommender scores cover exactly the stored candidates", ["eval_candidates", "recommender_scores"],
                sql, [category, category])
