"""Reading a source file as exact, numbered lines, in bounded batches.

A file is read in fixed-size binary pieces (hashed as they are read), gunzipped when its first
bytes are the gzip magic (whatever its name), and cut at ``\\n`` only, so line numbers are the
ones ``grep -n`` and editors show, whatever the bytes in between: blank lines, ``\\r\\n``, bytes
that are not UTF-8. A batch is an Arrow array of lines (each line keeps its ``\\n``) over one
buffer: nothing is copied per line, and memory is bounded by the batch size, not the file size.
A background thread reads and cuts the next batch while the caller works on the current one.
"""
from __future__ import annotations

import hashlib
import queue
import threading
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from srec.ingest.common import RAW_TEXT_MAX, IngestError

GZIP_MAGIC = b"\x1f\x8b"
READ_SIZE = 4 << 20      # bytes read from disk at a time
BATCH_BYTES = 32 << 20   # decompressed bytes per line batch (the memory bound, times ~3 in flight)


class _GzipProblem(Exception):
    pass


class SourceFile:
    """One source file: checked on open, its sha256 known once it has been read to the end."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.sha256: str | None = None
        self.gzip = False
        self.bytes_out = 0  # (decompressed) bytes handed out by the last full read
        if not self.path.exists():
            raise IngestError(f"{self.path}: file not found")
        if self.path.is_dir():
            raise IngestError(f"{self.path}: is a directory, expected a file")
        try:
            with open(self.path, "rb") as fh:
                self.gzip = fh.read(2) == GZIP_MAGIC
        except OSError as e:
            raise IngestError(f"{self.path}: cannot read: {e.strerror or e}") from e

    @property
    def name(self) -> str:
        """What the tables record as ``source_file``: the file name, so that the same data gives
        the same rows (and content hash) on every machine."""
        return self.path.name

    def chunks(self, read_size: int | None = None) -> Iterator[bytes]:
        """The file's (decompressed) bytes in pieces; sets ``sha256`` after the last one."""
        read_size = read_size or READ_SIZE
        hasher = hashlib.sha256()
        self.bytes_out = 0
        try:
            fh = open(self.path, "rb")
        except OSError as e:
            raise IngestError(f"{self.path}: cannot read: {e.strerror or e}") from e
        with fh:
            if not self.gzip:
                while True:
                    try:
                        raw = fh.read(read_size)
                    except OSError as e:
                        raise IngestError(f"{self.path}: read failed: {e.strerror or e}") from e
                    if not raw:
                        break
                    hasher.update(raw)
                    self.bytes_out += len(raw)
                    yield raw
            else:
                yield from self._gunzip(fh, hasher, read_size)
        self.sha256 = hasher.hexdigest()

    def _gunzip(self, fh, hasher, read_size: int) -> Iterator[bytes]:
        d = zlib.decompressobj(wbits=31)  # 31: gzip header and trailer (CRC32 + size are checked)
        while True:
            raw = fh.read(read_size)
            if not raw:
                break
            hasher.update(raw)
            data = raw
            while data:
                try:
                    out = d.decompress(data)
                except zlib.error as e:
                    raise _GzipProblem(f"corrupt gzip data ({e})") from e
                if out:
                    self.bytes_out += len(out)
                    yield out
                if d.eof:
                    rest = d.unused_data
                    if rest[:2] == GZIP_MAGIC:        # concatenated gzip members (what `cat a.gz b.gz` makes)
                        d = zlib.decompressobj(wbits=31)
                        data = rest
                    elif rest.strip(b"\x00"):
                        raise _GzipProblem("corrupt gzip data (unexpected bytes after the end of the gzip stream)")
                    else:
                        data = b""
                else:
                    data = b""
        if not d.eof:
            try:
                tail = d.flush()
            except zlib.error:
                tail = b""
            if tail:
                self.bytes_out += len(tail)
                yield tail
            raise _GzipProblem("truncated gzip file: the compressed stream ends before its end marker")


@dataclass
class LineBatch:
    """``n`` consecutive lines of a file, the first of them numbered ``first_line`` (1-based)."""

    first_line: int
    binary: pa.LargeBinaryArray          # each line's bytes, with its '\n' (the last line may lack one)
    text: pa.LargeStringArray            # the same lines as text; null where the bytes are not UTF-8
    bad_utf8: list[tuple[int, str, str]] = field(default_factory=list)  # (index, detail, raw text)

    @property
    def n(self) -> int:
        return len(self.binary)

    def line_numbers(self) -> pa.Array:
        return pa.array(np.arange(self.first_line, self.first_line + self.n, dtype=np.int64))

    def table(self) -> pa.Table:
        """``line`` (1-based number) and ``text``, in slices DuckDB can scan in parallel."""
        t = pa.Table.from_arrays([self.line_numbers(), self.text], names=["line", "text"])
        return pa.Table.from_batches(t.to_batches(max_chunksize=max(1, -(-self.n // 16))))


def _make_batch(buf: bytes, first_line: int, end: int | None = None) -> LineBatch:
    """The lines in ``buf[:end]`` (no copy: the arrays point into ``buf``)."""
    end = len(buf) if end is None else end
    a = np.frombuffer(buf, dtype=np.uint8, count=end)
    nl = np.flatnonzero(a == 10)
    ends_open = end > 0 and buf[end - 1] != 10
    n = len(nl) + (1 if ends_open else 0)
    offsets = np.empty(n + 1, dtype=np.int64)
    offsets[0] = 0
    offsets[1 : len(nl) + 1] = nl + 1
    if ends_open:
        offsets[n] = end
    data, off_buf = pa.py_buffer(buf), pa.py_buffer(offsets)
    binary = pa.Array.from_buffers(pa.large_binary(), n, [None, off_buf, data])
    try:
        text = binary.cast(pa.large_string())  # validates UTF-8 for the whole batch at C speed
        return LineBatch(first_line, binary, text)
    except pa.ArrowInvalid:
        pass
    # Rare: some line is not UTF-8. Find which, line by line, and null them in the text array.
    valid = np.ones(n, dtype=bool)
    bad: list[tuple[int, str, str]] = []
    view = memoryview(buf)
    for i in range(n):
        piece = view[offsets[i] : offsets[i + 1]]
        try:
            str(piece, "utf-8")
        except UnicodeDecodeError as e:
            valid[i] = False
            raw = bytes(piece).rstrip(b"\r\n").decode("utf-8", errors="replace")[:RAW_TEXT_MAX]
            bad.append((i, f"byte {e.start + 1} of the line (0x{piece[e.start]:02x}) is not valid UTF-8", raw))
    validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    text = pa.Array.from_buffers(pa.large_string(), n, [validity, off_buf, data], null_count=int((~valid).sum()))
    return LineBatch(first_line, binary, text, bad)


def iter_line_batches(src: SourceFile, batch_bytes: int | None = None) -> Iterator[LineBatch]:
    """Every line of ``src`` exactly once, in order, in batches of about ``batch_bytes``."""
    batch_bytes = batch_bytes or BATCH_BYTES
    pieces: list[bytes] = []
    size = 0
    next_line = 1
    try:
        for chunk in src.chunks():
            pieces.append(chunk)
            size += len(chunk)
            if size < batch_bytes:
                continue
            buf = b"".join(pieces)
            cut = buf.rfind(b"\n") + 1
            if cut == 0:  # one very long line so far: keep reading
                pieces, size = [buf], len(buf)
                continue
            rest = buf[cut:]
            batch = _make_batch(buf, next_line, cut)
            del buf
            pieces, size = ([rest], len(rest)) if rest else ([], 0)
            next_line += batch.n
            yield batch
    except _GzipProblem as e:
        readable = next_line - 1 + sum(p.count(b"\n") for p in pieces)
        raise IngestError(f"{src.path}: {e}; {readable} complete lines could be read before it") from None
    if size:
        batch = _make_batch(b"".join(pieces), next_line)
        yield batch


def iter_lines(src: SourceFile, batch_bytes: int | None = None) -> Iterator[tuple[int, str | None, bytes]]:
    """``(line number, text or None when not UTF-8, raw bytes)`` per line, for the per-line readers.

    Text and bytes keep the line's end (``\\n``, ``\\r\\n``)."""
    for batch in prefetched(iter_line_batches(src, batch_bytes)):
        texts = batch.text.to_pylist()
        raws = batch.binary.to_pylist()
        for i, (t, b) in enumerate(zip(texts, raws)):
            yield batch.first_line + i, t, b


_DONE = object()


def prefetched(it: Iterable, depth: int = 2) -> Iterator:
    """Run ``it`` in a background thread, ``depth`` items ahead of the consumer.

    Exceptions in the producer are re-raised in the consumer; a consumer that stops early
    stops the producer too."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in it:
                if not put((True, item)):
                    return
            put((True, _DONE))
        except BaseException as e:  # handed to the consumer
            put((False, e))

    thread = threading.Thread(target=produce, name="srec-ingest-reader", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        thread.join()
