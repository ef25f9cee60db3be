"""Malformed sources: every bad row is quarantined with the right reason at the right line, every
bad file raises an IngestError naming it, and what is read always reconciles.

User and item ids are real Amazon Beauty ids; ratings and times are SYNTHETIC (the shared data
has none)."""
from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest


import srec.ingest.source as source
from srec.config import CategoryConfig
from srec.ingest import IngestError, IngestStats, ingest_items, ingest_reviews
from tests.ingest_support import cfg

FIX = Path(__file__).parent / "fixtures" / "ingest"
U, U2 = "A1YJEY40YUW4SE", "A60XNB876KYML"
I, I2, I3 = "B004756YJA", "B004ZT0SSG", "B0020YLEYK"
T = 1_300_003_600






def rev(drop=(), **kw) -> bytes:
    d = {"overall": 5.0, "reviewerID": U, "asin": I, "reviewText": "synthetic", "unixReviewTime": T}
    d.update(kw)
    for k in drop:
        d.pop(k)
    return json.dumps(d).encode()


def quarantine(con, category="c", table="raw_reviews"):
    return con.execute(
        "SELECT source_line, reason, detail, raw_text, source_file FROM ingest_quarantine "
        "WHERE category = ? AND table_name = ? ORDER BY source_line, reason", [category, table]).fetchall()


def check_reconciled(con, stats: IngestStats, category="c"):
    assert stats.reconciles()
    (kept,) = con.execute(f"SELECT count(*) FROM {stats.table} WHERE category = ?", [category]).fetchone()
    assert kept == stats.rows_kept
    assert len(quarantine(con, category, stats.table)) == sum(stats.quarantined.values())
    log = con.execute("SELECT rows_read, rows_kept, rows_quarantined FROM ingest_log WHERE category = ? "
                      "AND table_name = ?", [category, stats.table]).fetchall()
    assert log == [(stats.rows_read, stats.rows_kept, sum(stats.quarantined.values()))]


# ------------------------------------------------------------------------------------------ reviews

FUTURE = int(time.time()) + 10 * 86_400
BAD_2018 = [  # (line bytes, expected reason or None for kept)
    (rev(), None),                                                      # 1
    (b"this is not json", "unparseable_line"),                          # 2
    (b"", "empty_line"),                                                # 3
    (rev(drop=["reviewerID"]), "missing_user"),                         # 4
    (rev(reviewerID=""), "missing_user"),                               # 5
    (rev(drop=["asin"]), "missing_item"),                               # 6
    (rev(overall="five"), "rating_not_a_number"),                       # 7
    (rev(overall=0), "rating_out_of_range"),                            # 8
    (rev(overall=7), "rating_out_of_range"),                            # 9
    (rev(drop=["overall"]), "missing_rating"),                          # 10
    (rev(overall=None), "missing_rating"),                              # 11
    (rev(drop=["unixReviewTime"]), "unusable_timestamp"),               # 12
    (rev(unixReviewTime=-5), "unusable_timestamp"),                     # 13
    (rev(unixReviewTime=315_532_800), "unusable_timestamp"),            # 14 (1980)
    (rev(unixReviewTime=FUTURE), "unusable_timestamp"),                 # 15
    (rev(unixReviewTime="abc"), "unusable_timestamp"),                  # 16
    (rev(), "duplicate"),                                               # 17: same as line 1
    (rev(unixReviewTime=T + 60), None),                                 # 18: same user+item, other time: kept
    (b"\xff\xfe" + rev(asin=I2), "invalid_utf8"),                       # 19
    (b"[1, 2]", "unparseable_line"),                                    # 20: JSON, not an object
    (b"  \t ", "empty_line"),                                           # 21
    (rev(asin=I2) + b"\r", None),                                       # 22: CRLF line end
    (rev(asin=I3, overall="4"), None),                                  # 23: a numeric string is a number
    (rev(reviewerID=U2, unixReviewTime=T + 0.7), None),                 # 24: float seconds
    (b'{"reviewerID": "caf\xe9", "asin": "X", "overall": 5, "unixReviewTime": 1300003600}', "invalid_utf8"),  # 25
    (b"{" + b"x" * 2000, "unparseable_line"),                           # 26: long garbage, raw_text cut
    (rev(reviewerID=U2, asin=I3), None),                                # 27: no final newline
]


def write_lines(path: Path, lines: list[bytes], final_newline=False, gz=False) -> Path:
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def assert_bad_2018(con, stats):
    expected_q = [(n, r) for n, (_, r) in enumerate(BAD_2018, start=1) if r]
    got = quarantine(con)
    assert [(g[0], g[1]) for g in got] == expected_q
    kept = con.execute("SELECT source_line, position, user_id, item_id, rating, timestamp FROM raw_reviews "
                       "ORDER BY position").fetchall()
    assert [k[0] for k in kept] == [n for n, (_, r) in enumerate(BAD_2018, start=1) if r is None]
    assert all(pos == line - 1 for line, pos, *_ in kept)          # position: ordinal of the line
    assert kept[0][2:] == (U, I, 5.0, T)
    assert kept[3][4] == 4.0 and kept[4][5] == T                    # "4" -> 4.0; 1300003600.7 -> 1300003600
    assert stats.rows_read == len(BAD_2018) and stats.rows_kept == len(kept)
    assert stats.quarantined == {
        "unparseable_line": 3, "empty_line": 2, "missing_user": 2, "missing_item": 1, "rating_not_a_number": 1,
        "rating_out_of_range": 2, "missing_rating": 2, "unusable_timestamp": 5, "duplicate": 1, "invalid_utf8": 2,
    }
    by_line = {g[0]: g for g in got}
    assert "line 1" in by_line[17][2]                               # the duplicate names the kept line
    assert "'five'" in by_line[7][2] and "outside [1.0, 5.0]" in by_line[9][2]
    assert "before 1990" in by_line[14][2] and "future" in by_line[15][2] and "no unixReviewTime" in by_line[12][2]
    assert "byte 1" in by_line[19][2] and "byte 20 of the line (0xe9)" in by_line[25][2]
    assert by_line[19][3].startswith("\ufffd\ufffd{")               # raw text shown with replacement chars
    assert by_line[2][3] == "this is not json"
    assert len(by_line[26][3]) == 500
    assert "not an object" in by_line[20][2]
    assert len({g[4] for g in got}) == 1 and got[0][4].startswith("bad.json")  # the file name
    check_reconciled(con, stats)


def test_amazon2018_row_problems_are_quarantined_at_exact_lines(con, tmp_path):
    path = write_lines(tmp_path / "bad.json", [b for b, _ in BAD_2018])
    stats = ingest_reviews(con, cfg("c", "amazon2018", path))
    assert_bad_2018(con, stats)


def test_line_numbers_survive_tiny_batches_and_gzip(con, tmp_path, monkeypatch):
    """Batches of a few lines and reads of 7 bytes: every batch boundary falls somewhere odd."""
    monkeypatch.setattr(source, "BATCH_BYTES", 300)
    monkeypatch.setattr(source, "READ_SIZE", 7)
    path = write_lines(tmp_path / "bad.json.gz", [b for b, _ in BAD_2018], gz=True)
    stats = ingest_reviews(con, cfg("c", "amazon2018", path))
    assert_bad_2018(con, stats)


def test_amazon2023_milliseconds_and_parent_asin(con, tmp_path):
    def r23(drop=(), **kw):
        d = {"rating": 5.0, "user_id": U, "parent_asin": I, "asin": I + "X", "timestamp": T * 1000 + 999}
        d.update(kw)
        for k in drop:
            d.pop(k)
        return json.dumps(d).encode()

    path = write_lines(tmp_path / "r.jsonl", [
        r23(),                                   # 1 kept, 1300003600999 ms -> 1300003600 s
        r23(timestamp=T),                        # 2 seconds where ms are due: 1970 -> unusable
        r23(drop=["parent_asin"], asin=I2),      # 3 no parent_asin: falls back to asin
        r23(rating=7, parent_asin=I3),           # 4 kept: rating_max is 10 here
        r23(rating=11, parent_asin=I3),          # 5 out of range
        r23(drop=["user_id"]),                   # 6
    ], final_newline=True)
    stats = ingest_reviews(con, cfg("c", "amazon2023", path, rating_max=10.0))
    kept = con.execute("SELECT source_line, item_id, rating, timestamp FROM raw_reviews ORDER BY position").fetchall()
    assert kept == [(1, I, 5.0, T), (3, I2, 5.0, T), (4, I3, 7.0, T)]
    q = quarantine(con)
    assert [(g[0], g[1]) for g in q] == [(2, "unusable_timestamp"), (5, "rating_out_of_range"), (6, "missing_user")]
    assert "ms is before 1990" in q[0][2] and "outside [1.0, 10.0]" in q[1][2]
    check_reconciled(con, stats)


def test_p5_sequences_problems(con, tmp_path):
    path = write_lines(tmp_path / "seq.txt", [
        f"{U} {I} {I2}".encode(),          # 1: rows 0, 1
        b"",                               # 2: row 2 empty_line
        f"{U2}".encode(),                  # 3: row 3 user without items
        f"U3 {I} {I} {I3}".encode(),       # 4: rows 4, 5 (a repeat of row 4: duplicate), 6
        b"U4 \xff " + I.encode(),          # 5: row 7 invalid_utf8
        f"  U5\t{I2}  {I3}  ".encode(),     # 6: rows 8, 9 (tabs and runs of spaces separate too)
    ], final_newline=True)
    stats = ingest_reviews(con, cfg("c", "p5_sequences", path))
    kept = con.execute("SELECT source_line, position, user_id, item_id FROM raw_reviews ORDER BY position").fetchall()
    assert kept == [(1, 0, U, I), (1, 1, U, I2), (4, 4, "U3", I), (4, 6, "U3", I3), (6, 8, "U5", I2), (6, 9, "U5", I3)]
    q = quarantine(con)
    assert [(g[0], g[1]) for g in q] == [(2, "empty_line"), (3, "missing_item"), (4, "duplicate"), (5, "invalid_utf8")]
    assert "line 4" in q[2][2] and q[1][3] == U2
    assert stats.rows_read == 10 and stats.rows_kept == 6
    check_reconciled(con, stats)


def test_recbole_problems_and_optional_columns(con, tmp_path):
    inter = tmp_path / "x.inter"
    inter.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        f"{U}\t{I}\t5.0\t{T}\n"            # 2 kept
        f"{U}\t{I2}\t5.0\n"                # 3 field missing
        f"{U}\t{I3}\t\t{T}\n"              # 4 empty rating
        f"\t{I3}\t4\t{T}\n"                # 5 empty user
        f"{U2}\t{I}\t9\t{T}\n"             # 6 out of range
        "\n"                               # 7 blank
        f"{U2}\t{I2}\t1\t{T}\r\n"          # 8 kept, CRLF
    )
    stats = ingest_reviews(con, cfg("c", "recbole_atomic", inter))
    kept = con.execute("SELECT source_line, position, user_id, item_id, rating FROM raw_reviews ORDER BY position").fetchall()
    assert kept == [(2, 0, U, I, 5.0), (8, 6, U2, I2, 1.0)]
    q = quarantine(con)
    assert [(g[0], g[1]) for g in q] == [(3, "unparseable_line"), (4, "missing_rating"), (5, "missing_user"),
                                         (6, "rating_out_of_range"), (7, "empty_line")]
    assert "expected 4 tab-separated fields, found 3" in q[0][2]
    check_reconciled(con, stats)

    implicit = tmp_path / "y.inter"
    implicit.write_text(f"user_id:token\titem_id:token\n{U}\t{I}\n{U}\t{I2}\n")
    stats = ingest_reviews(con, cfg("c", "recbole_atomic", implicit))
    assert con.execute("SELECT rating, timestamp, count(*) FROM raw_reviews GROUP BY ALL").fetchall() == [(None, None, 2)]
    assert stats.quarantined == {}


# ------------------------------------------------------------------------------------------ items

def test_amazon2014_meta_problems(con, tmp_path):
    meta = write_lines(tmp_path / "meta.json", [
        repr({"asin": I, "title": "first", "categories": [["Beauty", "Makeup"]]}).encode(),  # 1
        json.dumps({"asin": I2, "title": "a JSON line", "flag": True}).encode(),           # 2: JSON, not a literal
        b"{'asin': 'B00', 'title': ",                                                        # 3
        repr({"title": "no asin"}).encode(),                                                 # 4
        repr({"asin": I, "title": "second"}).encode(),                                       # 5 duplicate of 1
        b"",                                                                                 # 6
        b"{'asin': 'B01', 'title': 'caf\xe9'}",                                              # 7
        b"['a', 'list']",                                                                    # 8
        repr({"asin": I3, "title": "ok", "imUrl": "http://x/y.jpg"}).encode(),               # 9
    ])
    stats = ingest_items(con, cfg("c", "amazon2014", FIX / "amazon2014_reviews.json", meta))
    kept = con.execute("SELECT source_line, item_id, title, categories, image_url FROM raw_items ORDER BY source_line").fetchall()
    assert kept == [(1, I, "first", "Beauty > Makeup", None), (2, I2, "a JSON line", None, None),
                    (9, I3, "ok", None, "http://x/y.jpg")]
    q = quarantine(con, table="raw_items")
    assert [(g[0], g[1]) for g in q] == [(3, "unparseable_line"), (4, "missing_item"), (5, "duplicate"),
                                         (6, "empty_line"), (7, "invalid_utf8"), (8, "unparseable_line")]
    assert "line 1" in q[2][2] and "caf\ufffd" in q[4][3]
    check_reconciled(con, stats)
    assert quarantine(con, table="raw_reviews") == []


def test_csv_titles_problems(con, tmp_path):
    titles = tmp_path / "titles.csv"
    titles.write_bytes(
        b"item_id,title\n"                  # 1 header
        b'I1,"Title, with comma"\n'         # 2
        b'I2,"multi\nline title"\n'         # 3-4: one record, starting at line 3
        b"I3,\n"                            # 5 empty title: kept
        b"I4,a,b\n"                         # 6 three fields
        b"I1,again\n"                       # 7 duplicate
        b"\n"                               # 8
        b'I5,"caf\xe9"\n'                   # 9
        b",no id\n"                         # 10
        b"I6,ok"                            # 11
    )
    stats = ingest_items(con, cfg("c", "p5_sequences", FIX / "beauty_user_sequence.txt", titles))
    kept = con.execute("SELECT source_line, item_id, title FROM raw_items ORDER BY source_line").fetchall()
    assert kept == [(2, "I1", "Title, with comma"), (3, "I2", "multi\nline title"), (5, "I3", None), (11, "I6", "ok")]
    q = quarantine(con, table="raw_items")
    assert [(g[0], g[1]) for g in q] == [(6, "unparseable_line"), (7, "duplicate"), (8, "empty_line"),
                                         (9, "invalid_utf8"), (10, "missing_item")]
    assert stats.rows_read == 9
    check_reconciled(con, stats)


# ------------------------------------------------------------------------------------------ files

def test_missing_file_and_directory(con, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(IngestError, match=rf"{missing}.*file not found"):
        ingest_reviews(con, cfg("c", "amazon2018", missing))
    with pytest.raises(IngestError, match="is a directory"):
        ingest_reviews(con, cfg("c", "amazon2018", tmp_path))
    with pytest.raises(IngestError, match=r"nope\.csv.*file not found"):
        ingest_items(con, cfg("c", "p5_sequences", FIX / "beauty_user_sequence.txt", tmp_path / "nope.csv"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(con, tmp_path):
    path = write_lines(tmp_path / "locked.json", [rev()])
    path.chmod(0)
    with pytest.raises(IngestError, match=r"locked\.json.*cannot read"):
        ingest_reviews(con, cfg("c", "amazon2018", path))


def test_truncated_and_corrupt_gzip_fail_and_keep_the_previous_partition(con, tmp_path):
    good = cfg("c", "amazon2018", FIX / "amazon2018_reviews.json.gz")
    before = ingest_reviews(con, good)
    data = (FIX / "amazon2018_reviews.json.gz").read_bytes()

    truncated = tmp_path / "cut.json.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngestError, match=rf"{truncated}: truncated gzip file"):
        ingest_reviews(con, cfg("c", "amazon2018", truncated))
    no_trailer = tmp_path / "cut2.json.gz"
    no_trailer.write_bytes(data[:-4])  # the size field of the trailer is missing
    with pytest.raises(IngestError, match=r"cut2\.json\.gz: truncated gzip"):
        ingest_reviews(con, cfg("c", "amazon2018", no_trailer))

    corrupt = tmp_path / "bad.json.gz"
    body = bytearray(gzip.compress(b"\n".join(rev(asin=f"B{i:09d}") for i in range(2000))))
    body[-6] ^= 0xFF  # inside the CRC32 of the trailer
    corrupt.write_bytes(bytes(body))
    with pytest.raises(IngestError, match=r"bad\.json\.gz: corrupt gzip data"):
        ingest_reviews(con, cfg("c", "amazon2018", corrupt))

    # the failed ingests changed nothing
    assert con.execute("SELECT count(*) FROM raw_reviews WHERE category = 'c'").fetchone() == (before.rows_kept,)
    assert con.execute("SELECT rows_read FROM ingest_log WHERE category = 'c'").fetchall() == [(before.rows_read,)]
    assert {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()} == {
        "raw_reviews", "raw_items", "ingest_quarantine", "ingest_log"}


def test_empty_and_unusable_files(con, tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    with pytest.raises(IngestError, match=rf"{empty}: empty file \(0 lines\)"):
        ingest_reviews(con, cfg("c", "amazon2018", empty))
    empty_gz = tmp_path / "empty.json.gz"
    empty_gz.write_bytes(gzip.compress(b""))
    with pytest.raises(IngestError, match=r"empty\.json\.gz: empty file"):
        ingest_reviews(con, cfg("c", "amazon2018", empty_gz))
    blank = tmp_path / "blank.txt"
    blank.write_bytes(b"\n\n  \n")
    with pytest.raises(IngestError, match=r"blank\.txt: no usable row: all 3 rows read were quarantined \(empty_line: 3\)"):
        ingest_reviews(con, cfg("c", "p5_sequences", blank))
    # a file in another format than the category says
    with pytest.raises(IngestError, match=r"beauty_item_titles\.csv: no usable row.*unparseable_line.*format \(amazon2018\)"):
        ingest_reviews(con, cfg("c", "amazon2018", FIX / "beauty_item_titles.csv"))
    header_only = tmp_path / "h.inter"
    header_only.write_text("user_id:token\titem_id:token\n")
    with pytest.raises(IngestError, match=r"h\.inter: no data rows"):
        ingest_reviews(con, cfg("c", "recbole_atomic", header_only))
    titles = tmp_path / "t.csv"
    titles.write_text("item_id,title\n")
    with pytest.raises(IngestError, match=r"t\.csv: no data rows"):
        ingest_items(con, cfg("c", "p5_sequences", FIX / "beauty_user_sequence.txt", titles))
    assert con.execute("SELECT count(*) FROM duckdb_tables() WHERE table_name = 'ingest_log'").fetchone() == (0,)


def test_unknown_format(con):
    bad = CategoryConfig(name="c", format="parquet", reviews=FIX / "recbole.inter", items=FIX / "recbole.item")
    with pytest.raises(IngestError, match=r"recbole\.inter: unknown format 'parquet'"):
        ingest_reviews(con, bad)
    with pytest.raises(IngestError, match=r"recbole\.item: unknown format 'parquet'"):
        ingest_items(con, bad)


def test_single_document_json_errors(con, tmp_path):
    broken = tmp_path / "x.inter.json"
    broken.write_text('{"0": [1, 2],\n "1": [3,, 4]}')
    with pytest.raises(IngestError, match=r"x\.inter\.json: line 2: not valid JSON"):
        ingest_reviews(con, cfg("c", "inter_item_json", broken))
    latin1 = tmp_path / "y.inter.json"
    latin1.write_bytes(b'{"0": [1],\n"caf\xe9": [2]}')
    with pytest.raises(IngestError, match=r"y\.inter\.json: line 2: bytes that are not valid UTF-8"):
        ingest_reviews(con, cfg("c", "inter_item_json", latin1))
    listed = tmp_path / "z.inter.json"
    listed.write_text("[[1, 2]]")
    with pytest.raises(IngestError, match=r"z\.inter\.json: expected a JSON object"):
        ingest_reviews(con, cfg("c", "inter_item_json", listed))
    # row-level problems inside a good document are quarantined by record number
    mixed = tmp_path / "m.inter.json"
    mixed.write_text(json.dumps({"0": [1, 2], "1": [], "2": "oops", "3": [3, None, 3]}))
    stats = ingest_reviews(con, cfg("c", "inter_item_json", mixed))
    q = quarantine(con)
    assert [(g[0], g[1]) for g in q] == [(2, "missing_item"), (3, "unparseable_line"), (4, "duplicate"),
                                         (4, "missing_item")]
    assert stats.rows_kept == 3
    check_reconciled(con, stats)


def test_recbole_header_without_item_id(con, tmp_path):
    path = tmp_path / "bad.inter"
    path.write_text("user_id:token\tproduct:token\nu\ti\n")
    with pytest.raises(IngestError, match=r"bad\.inter: the RecBole header has no item_id field"):
        ingest_reviews(con, cfg("c", "recbole_atomic", path))
    path.write_text("user_id\titem_id\nu\ti\n")
    with pytest.raises(IngestError, match=r"bad\.inter: line 1 is not a RecBole header"):
        ingest_reviews(con, cfg("c", "recbole_atomic", path))


def test_stats_reconciles():
    assert IngestStats("raw_reviews", ["f"], 10, 7, {"duplicate": 2, "empty_line": 1}).reconciles()
    assert not IngestStats("raw_reviews", ["f"], 10, 7, {"duplicate": 2}).reconciles()
