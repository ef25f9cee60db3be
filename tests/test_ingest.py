"""Ingest readers on real data (tests/fixtures/ingest, cut from ../shared/data by make_fixtures.py).

The P5 and Scientific fixtures are real and unmodified. The Amazon 2014/2018/2023 and RecBole
fixtures carry the real ids (and titles) of the first Beauty users, with SYNTHETIC ratings,
times, brands, categories and image URLs: the shared data has none of those.
"""
from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest


from srec.ingest import QUARANTINE_REASONS, IngestStats, ingest_items, ingest_reviews
from srec.tables import TABLES
from tests.ingest_support import cfg

FIX = Path(__file__).parent / "fixtures" / "ingest"






def p5_lines() -> list[list[str]]:
    return [line.split() for line in (FIX / "beauty_user_sequence.txt").read_text().splitlines()]


def json_pairs() -> list[tuple[str, str, float, int]]:
    """(user, item, rating, seconds) of the synthetic Amazon fixtures, from the 2014 file."""
    out = []
    for line in (FIX / "amazon2014_reviews.json").read_text().splitlines():
        d = json.loads(line)
        out.append((d["reviewerID"], d["asin"], d["overall"], d["unixReviewTime"]))
    return out


def assert_consistent(con, category: str, stats: IngestStats) -> None:
    """Stats reconcile and agree with all three tables."""
    assert stats.reconciles()
    assert stats.rows_read == stats.rows_kept + sum(stats.quarantined.values())
    assert set(stats.quarantined) <= set(QUARANTINE_REASONS)
    (kept,) = con.execute(f"SELECT count(*) FROM {stats.table} WHERE category = ?", [category]).fetchone()
    assert kept == stats.rows_kept
    q = dict(con.execute(
        "SELECT reason, count(*) FROM ingest_quarantine WHERE category = ? AND table_name = ? GROUP BY ALL",
        [category, stats.table]).fetchall())
    assert q == stats.quarantined
    log = con.execute(
        "SELECT source_file, source_sha256, rows_read, rows_kept, rows_quarantined FROM ingest_log "
        "WHERE category = ? AND table_name = ?", [category, stats.table]).fetchall()
    assert len(log) == len(stats.files) == 1
    f = Path(stats.files[0])
    assert log[0] == (f.name, hashlib.sha256(f.read_bytes()).hexdigest(), stats.rows_read, stats.rows_kept,
                      sum(stats.quarantined.values()))


def test_tables_have_the_contract_columns(con):
    ingest_reviews(con, cfg("beauty", "p5_sequences", FIX / "beauty_user_sequence.txt"))
    for table in ("raw_reviews", "raw_items", "ingest_quarantine", "ingest_log"):
        cols = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()]
        expected = [line.split()[0] for line in TABLES[table].strip().splitlines() if line.strip()]
        assert cols == expected


def test_p5_sequences_real_beauty(con):
    c = cfg("beauty", "p5_sequences", FIX / "beauty_user_sequence.txt", FIX / "beauty_item_titles.csv")
    stats = ingest_reviews(con, c)
    lines = p5_lines()
    expected = [(u, it, n + 1) for n, (u, *items) in enumerate(lines) for it in items]
    assert stats.table == "raw_reviews" and stats.rows_read == stats.rows_kept == len(expected)
    assert stats.quarantined == {}
    got = con.execute(
        "SELECT user_id, item_id, source_line, position, rating, timestamp, source_file FROM raw_reviews "
        "WHERE category = 'beauty' ORDER BY position").fetchall()
    assert [(u, i, ln) for u, i, ln, *_ in got] == expected          # source order, exact lines
    assert [r[3] for r in got] == list(range(len(expected)))         # running count of (line, item)
    assert {r[4] for r in got} == {None} and {r[5] for r in got} == {None}
    assert {r[6] for r in got} == {"beauty_user_sequence.txt"}
    assert_consistent(con, "beauty", stats)

    istats = ingest_items(con, c)
    with open(FIX / "beauty_item_titles.csv", newline="", encoding="utf-8") as f:
        body = list(csv.reader(f))[1:]
    assert istats.table == "raw_items" and istats.rows_read == istats.rows_kept == len(body)
    titles = dict(con.execute("SELECT item_id, title FROM raw_items WHERE category = 'beauty'").fetchall())
    assert titles == {i: (t or None) for i, t in body}              # commas inside quotes survive
    assert titles["B000GZES7A"] is None                              # the real empty title: kept, NULL
    assert "," in titles["B00011QTZI"]
    lines_of = dict(con.execute("SELECT item_id, source_line FROM raw_items WHERE category = 'beauty'").fetchall())
    assert lines_of[body[0][0]] == 2                                 # line 1 is the header
    assert_consistent(con, "beauty", istats)


def test_inter_item_json_real_scientific(con):
    c = cfg("sci", "inter_item_json", FIX / "scientific.inter.json", FIX / "scientific.item.json")
    inter = json.loads((FIX / "scientific.inter.json").read_text())
    stats = ingest_reviews(con, c)
    expected = [(u, str(i), rec) for rec, (u, items) in enumerate(inter.items(), start=1) for i in items]
    got = con.execute("SELECT user_id, item_id, source_line, position FROM raw_reviews ORDER BY position").fetchall()
    assert [g[:3] for g in got] == expected
    assert [g[3] for g in got] == list(range(len(expected)))
    assert_consistent(con, "sci", stats)

    items = json.loads((FIX / "scientific.item.json").read_text())
    istats = ingest_items(con, c)
    assert istats.rows_kept == len(items)
    row = con.execute("SELECT title, brand, categories, description, source_line FROM raw_items "
                      "WHERE item_id = '0'").fetchone()
    assert row[0] == items["0"]["title"]
    assert row[1] == "Sealed Unit Parts Co., Inc."
    assert row[2] == "Industrial & Scientific | Industrial Electrical | Passive Components | Capacitors"
    assert row[3] == items["0"]["description"]
    assert row[4] == 1
    assert_consistent(con, "sci", istats)


@pytest.mark.parametrize(
    ("fmt", "reviews", "meta"),
    [
        ("amazon2014", "amazon2014_reviews.json", "amazon2014_meta.json.gz"),
        ("amazon2018", "amazon2018_reviews.json.gz", "amazon2018_meta.json.gz"),
        ("amazon2023", "amazon2023_reviews.jsonl.gz", "amazon2023_meta.jsonl.gz"),
        ("recbole_atomic", "recbole.inter", "recbole.item"),
    ],
)
def test_rated_formats(con, fmt, reviews, meta):
    c = cfg("b", fmt, FIX / reviews, FIX / meta)
    stats = ingest_reviews(con, c)
    pairs = json_pairs()
    assert stats.rows_read == stats.rows_kept == len(pairs) and stats.quarantined == {}
    got = con.execute("SELECT user_id, item_id, rating, timestamp, position, source_line FROM raw_reviews "
                      "ORDER BY position").fetchall()
    assert [g[:4] for g in got] == pairs          # amazon2023: milliseconds stored as seconds
    first = 2 if fmt == "recbole_atomic" else 1   # RecBole line 1 is the header
    assert [g[5] for g in got] == list(range(first, first + len(pairs)))
    assert [g[4] for g in got] == list(range(len(pairs)))
    assert_consistent(con, "b", stats)

    istats = ingest_items(con, c)
    n_items = len({p[1] for p in pairs})
    assert istats.rows_read == istats.rows_kept == n_items
    titles = dict(con.execute("SELECT item_id, title FROM raw_items").fetchall())
    with open(FIX / "beauty_item_titles.csv", newline="", encoding="utf-8") as f:
        real = {r[0]: r[1] for r in csv.reader(f)}
    assert titles == {i: real[i] or None for i in titles}
    assert_consistent(con, "b", istats)


def test_item_field_mapping_per_format(con):
    def item(fmt, meta, item_id="B0000YUX4O"):  # the second item of the synthetic metas
        ingest_items(con, cfg(fmt, fmt, FIX / "amazon2014_reviews.json", FIX / meta))
        return con.execute("SELECT title, description, brand, categories, image_url, image_path FROM raw_items "
                           "WHERE category = ? AND item_id = ?", [fmt, item_id]).fetchone()

    title = "Mebco Tortoise Shower Detangler"
    assert item("amazon2014", "amazon2014_meta.json.gz") == (
        title, None, "Brand1", "Beauty > Skin Care > Face | Beauty > Makeup",
        "http://ecx.images-amazon.com/images/I/B0000YUX4O.jpg", None)
    assert item("amazon2018", "amazon2018_meta.json.gz") == (
        title, "synthetic description", "Brand1", "Beauty | Skin Care", "https://images/I/B0000YUX4O.jpg", None)
    # 2023: hi_res is null for this item, so the large image; store is the brand; features follow the description
    assert item("amazon2023", "amazon2023_meta.jsonl.gz") == (
        title, "synthetic description synthetic feature", "Store1", "Beauty | Face", "https://l/B0000YUX4O.jpg", None)
    assert item("amazon2023", "amazon2023_meta.jsonl.gz", "7806397051")[4] == "https://h/7806397051.jpg"
    assert item("recbole_atomic", "recbole.item") == (title, None, "Brand1", "Beauty | Skin Care", None, None)


def test_gzip_is_detected_by_magic_bytes_not_suffix(con, tmp_path):
    disguised = tmp_path / "reviews.json"                      # gzip bytes, plain name
    shutil.copy(FIX / "amazon2018_reviews.json.gz", disguised)
    plain_named_gz = tmp_path / "plain.json.gz"                # plain bytes, .gz name
    plain_named_gz.write_bytes(gzip.decompress((FIX / "amazon2018_reviews.json.gz").read_bytes()))
    a = ingest_reviews(con, cfg("a", "amazon2018", disguised))
    b = ingest_reviews(con, cfg("b", "amazon2018", plain_named_gz))
    assert a.rows_kept == b.rows_kept == len(json_pairs())
    diff = con.execute("""SELECT count(*) FROM (
        SELECT user_id, item_id, rating, timestamp, position FROM raw_reviews WHERE category = 'a'
        EXCEPT SELECT user_id, item_id, rating, timestamp, position FROM raw_reviews WHERE category = 'b')""").fetchone()
    assert diff == (0,)
    assert a.sha256[str(disguised)] == hashlib.sha256(disguised.read_bytes()).hexdigest()  # hash of the bytes as stored


def test_concatenated_gzip_members(con, tmp_path):
    lines = (FIX / "amazon2014_reviews.json").read_bytes().splitlines(keepends=True)
    path = tmp_path / "multi.json.gz"
    path.write_bytes(gzip.compress(b"".join(lines[:10])) + gzip.compress(b"".join(lines[10:])))
    stats = ingest_reviews(con, cfg("m", "amazon2014", path))
    assert stats.rows_kept == len(lines)


def test_ingesting_twice_replaces_and_categories_coexist(con, tmp_path):
    beauty = cfg("beauty", "p5_sequences", FIX / "beauty_user_sequence.txt", FIX / "beauty_item_titles.csv")
    sci = cfg("sci", "inter_item_json", FIX / "scientific.inter.json", FIX / "scientific.item.json")
    bad = tmp_path / "seq.txt"
    bad.write_text("U1 I1 I2\n\nU2 I3\n")  # one blank line -> one quarantine row
    small = cfg("beauty", "p5_sequences", bad, None)

    s1 = ingest_reviews(con, beauty)
    ingest_items(con, beauty)
    ingest_reviews(con, sci)
    ingest_items(con, sci)
    s2 = ingest_reviews(con, beauty)  # again: replaces, never appends
    assert s2.rows_kept == s1.rows_kept

    def counts(category):
        return con.execute("""SELECT
            (SELECT count(*) FROM raw_reviews WHERE category = $c), (SELECT count(*) FROM raw_items WHERE category = $c),
            (SELECT count(*) FROM ingest_quarantine WHERE category = $c), (SELECT count(*) FROM ingest_log WHERE category = $c)
            """, {"c": category}).fetchone()

    assert counts("beauty") == (s1.rows_kept, 124 - 1, 0, 2)
    sci_before = counts("sci")
    assert sci_before[0] == 9 + 5 + 10 and sci_before[3] == 2

    s3 = ingest_reviews(con, small)   # the same category from another file, with a quarantined row
    assert (s3.rows_read, s3.rows_kept, s3.quarantined) == (4, 3, {"empty_line": 1})
    assert counts("beauty") == (3, 123, 1, 2)   # items of 'beauty' untouched by a reviews ingest
    s4 = ingest_reviews(con, small)
    assert counts("beauty") == (3, 123, 1, 2)   # quarantine replaced too
    assert s4 == s3
    # raw_items / its quarantine untouched by the reviews ingests; the other category untouched by all
    assert counts("sci") == sci_before
    # no items file: the category's items (and their log and quarantine rows) go, nothing else
    empty = ingest_items(con, small)
    assert (empty.table, empty.files, empty.rows_read, empty.rows_kept, empty.quarantined) == ("raw_items", [], 0, 0, {})
    assert empty.reconciles()
    assert counts("beauty") == (3, 0, 1, 1)
    assert counts("sci") == sci_before


def test_no_stage_tables_left_behind(con):
    ingest_reviews(con, cfg("beauty", "p5_sequences", FIX / "beauty_user_sequence.txt"))
    names = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    assert names == {"raw_reviews", "raw_items", "ingest_quarantine", "ingest_log"}
