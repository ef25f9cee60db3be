"""The line reader under ingest: exact line numbers whatever the bytes, batch sizes and compression."""
from __future__ import annotations

import gzip
import random
import threading
from pathlib import Path

import pytest

from srec.ingest import IngestError
from srec.ingest.source import SourceFile, iter_line_batches, prefetched

PIECES = [b"", b" ", b"\r", b"{\"a\": 1}", b"\xff", b"\xc3\xa9", b"\xe9", b"plain text", b"\t", b"x" * 300]


def random_lines(seed: int, n: int) -> list[bytes]:
    rng = random.Random(seed)
    return [b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 4))) for _ in range(n)]


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("final_newline", [False, True])
@pytest.mark.parametrize("batch_bytes", [1, 50, 1000, 1 << 20])
def test_batches_reproduce_the_file_line_by_line(tmp_path: Path, gz, final_newline, batch_bytes):
    lines = random_lines(batch_bytes + gz + 2 * final_newline, 400)
    data = b"\n".join(lines) + (b"\n" if final_newline else b"")
    path = tmp_path / ("f.gz" if gz else "f.txt")
    path.write_bytes(gzip.compress(data) if gz else data)

    src = SourceFile(path)
    got: list[tuple[int, bytes, str | None]] = []
    bad_seen: list[int] = []
    for batch in iter_line_batches(src, batch_bytes=batch_bytes):
        assert batch.first_line == len(got) + 1
        for i, (b, t) in enumerate(zip(batch.binary.to_pylist(), batch.text.to_pylist())):
            got.append((batch.first_line + i, b, t))
        bad_seen += [batch.first_line + i for i, _, _ in batch.bad_utf8]

    expected = data.split(b"\n")
    if data.endswith(b"\n"):  # a final newline ends the last line; it does not start another
        expected = expected[:-1]
    assert len(got) == len(expected)
    for (n, b, t), want in zip(got, expected):
        assert b.rstrip(b"\n") == want, n                   # the exact bytes of line n
        try:
            assert t == b.decode("utf-8")
        except UnicodeDecodeError:
            assert t is None and n in bad_seen              # not UTF-8: text is null and reported
    assert bad_seen == [n for n, b, _ in got if _not_utf8(b)]
    assert src.sha256 is not None and src.bytes_out == len(data)


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return False
    except UnicodeDecodeError:
        return True


def test_truncated_gzip_says_how_far_it_got(tmp_path):
    data = gzip.compress(b"".join(b"line %d\n" % i for i in range(50_000)))
    path = tmp_path / "cut.gz"
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(IngestError, match=r"cut\.gz: truncated gzip file.*\d+ complete lines could be read"):
        for _ in iter_line_batches(SourceFile(path), batch_bytes=1000):
            pass


def test_prefetched_passes_errors_and_stops_its_thread():
    def gen():
        yield 1
        yield 2
        raise ValueError("boom")

    out = []
    with pytest.raises(ValueError, match="boom"):
        for x in prefetched(gen()):
            out.append(x)
    assert out == [1, 2]

    before = threading.active_count()
    it = prefetched(iter(range(1000)), depth=1)
    assert next(it) == 0
    it.close()  # the consumer stops early: the producer thread ends too
    assert threading.active_count() == before
