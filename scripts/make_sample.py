"""Cut the shipped `beauty` sample from the shared Amazon Beauty 5-core split.

Keeps N users (seeded random choice) with their full, unmodified sequences and the
real titles of every item they touch, written gzip-compressed in the same P5 format
the full dataset uses, so the sample goes through the same reader.

    python scripts/make_sample.py [--users 2000] [--seed 7] [--source ../shared/data/amazon-beauty]
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared" / "data" / "amazon-beauty")
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "samples" / "beauty")
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()

    lines = (args.source / "user_sequence.txt").read_text(encoding="utf-8").splitlines()
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(range(len(lines)), args.users))  # keep source order
    kept = [lines[i] for i in chosen]
    items = {tok for line in kept for tok in line.split()[1:]}

    args.out.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the gzip bytes identical across runs (reproducible commits).
    with open(args.out / "user_sequence.txt.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(("\n".join(kept) + "\n").encode("utf-8"))

    with open(args.source / "item_titles.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f)]
    header, body = rows[0], [r for r in rows[1:] if r[0] in items]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(body)
    with open(args.out / "item_titles.csv.gz", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(buf.getvalue().encode("utf-8"))
    n_inter = sum(len(line.split()) - 1 for line in kept)
    print(f"sample: {len(kept)} users, {n_inter} interactions, {len(items)} items, {len(body)} titles -> {args.out}")


if __name__ == "__main__":
    main()
