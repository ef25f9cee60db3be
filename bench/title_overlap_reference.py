"""How much a text-only signal ranks the stored candidates: title-word overlap with the user's history.

Not a model srec ships: a reference for what the recommender's prompt carries. For every user's stored
1+20 candidates (valid and test) a candidate scores the sum, over the words its title shares with the
titles of the user's most recent ``--history`` items before the target, of 1 / log(2 + the word's count
over all the category's titles) (rare words weigh more). Words: lower-cased runs of letters and digits,
3 characters or more. AUC as the report computes it (slot 0 the positive, ties count half).

Reads a materialized database (default ``data/srec.duckdb`` after ``scripts/demo.sh``) read-only.
Results: bench/results/title_overlap_reference.{json,md}.
"""
from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

WORD = re.compile(r"[a-z0-9]+")


def words(title: str) -> set[str]:
    return {w for w in WORD.findall(title.lower()) if len(w) > 2}


def title_weights(con, category: str) -> tuple[dict[str, str], dict[str, float]]:
    """(item -> title, word -> weight): a word weighs 1 / log(2 + its count over all the category's titles)."""
    titles = dict(con.execute("SELECT item_id, coalesce(any_value(title), '') FROM raw_items WHERE category = ? "
                              "GROUP BY item_id", [category]).fetchall())
    counts = collections.Counter(w for t in titles.values() for w in words(t))
    return titles, {w: 1 / math.log(2 + c) for w, c in counts.items()}


def overlap_auc(con, category: str, split: str, history: int) -> tuple[float, int]:
    import numpy as np

    from srec.recommender.scoring import mean_auc

    titles, weight = title_weights(con, category)
    # The items before the split's target, in order, per user.
    seqs: dict[str, list[str]] = collections.defaultdict(list)
    targets: dict[str, int] = {}
    for user, item, seq, sp in con.execute("SELECT user_id, item_id, seq_index, split FROM interactions "
                                           "WHERE category = ? ORDER BY user_id, seq_index", [category]).fetchall():
        if sp == split:
            targets[user] = len(seqs[user])
        seqs[user].append(item)
    cands = con.execute("SELECT user_id, item_id FROM eval_candidates WHERE category = ? AND split = ? AND "
                        "protocol = '1+20' ORDER BY user_id, slot", [category, split]).fetchall()
    rows: dict[str, list[str]] = collections.defaultdict(list)
    for user, item in cands:
        rows[user].append(item)
    scores = []
    for user, items in rows.items():
        seen = set().union(*(words(titles.get(i, "")) for i in seqs[user][:targets[user]][-history:]))
        scores.append([sum(weight[w] for w in words(titles.get(i, "")) & seen) for i in items])
    return mean_auc(np.array(scores), 21), len(scores)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", default=str(ROOT / "data" / "srec.duckdb"))
    ap.add_argument("--category", default="beauty")
    ap.add_argument("--history", type=int, default=20, help="most recent history items whose titles count")
    args = ap.parse_args()
    import duckdb

    con = duckdb.connect(args.db, read_only=True)
    figures = {}
    for split in ("valid", "test"):
        auc, users = overlap_auc(con, args.category, split, args.history)
        figures[split] = {"auc": round(auc, 4), "users": users}
        print(f"{args.category} {split} 1+20: title-overlap AUC {auc:.4f} over {users} users", flush=True)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": "python bench/title_overlap_reference.py " + " ".join(sys.argv[1:]),
              "database": args.db, "category": args.category, "history": args.history, "protocol": "1+20",
              "figures": figures}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "title_overlap_reference.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["# Title-word overlap: a text-only reference on the stored candidates", "",
             f"{result['date']}; `{result['command'].strip()}`; database `{Path(args.db).name}`, category "
             f"`{args.category}`, protocol 1+20 (the report's stored candidates), the last {args.history} "
             "history items' titles before the target. Not a shipped model: it shows how much the titles in "
             "the recommender's prompt alone rank the candidates.", "",
             "| split | users | AUC |", "|---|---:|---:|"]
    lines += [f"| {s} | {f['users']:,} | {f['auc']:.4f} |" for s, f in figures.items()]
    (RESULTS / "title_overlap_reference.md").write_text("\n".join(lines) + "\n")
    print(f"results: {RESULTS / 'title_overlap_reference.json'}, {RESULTS / 'title_overlap_reference.md'}")


if __name__ == "__main__":
    main()
