"""Item images: resolve, download, validate and normalise one image per item (table ``item_images``).

Every item a model may see (the distinct ``item_id`` of ``interactions`` for the category) gets one row:

* ``source='path'``: a local file (``raw_items.image_path``; relative paths against ``items_dir``).
* ``source='url'``: ``raw_items.image_url`` downloaded (http/https only) into a content-addressed
  cache with a timeout, retries and a size cap. Network failures are recorded, never raised.
* ``source='placeholder'``: a deterministic product-like image rendered from (item_id, title), for
  datasets that ship no images at all (``synthetic=TRUE``: not a real product image).
* ``source='none'``: nothing to resolve.

Images are validated with Pillow (truncated, corrupt, decompression bombs), converted to RGB
(CMYK; RGBA/LA/P with transparency composited on white; 16-bit scaled to 8-bit), downscaled so the
longest side is at most ``max_side`` and written as deterministic PNG (no metadata) under
``cache_dir/normalized/<sha[:2]>/<sha>.png``; ``image_sha256`` is the sha256 of those PNG bytes.

Status per item: ``ok`` / ``missing`` (no source, file not found, download failed or disabled) /
``invalid`` (the source exists but is not a usable image, or an unsupported URL). ``reason`` is
``'<category>: <detail>'`` (or just ``'<category>'``); ``ImageStats.reasons`` counts categories.

Determinism: the same input bytes (or item id and title) and settings give the same PNG bytes with
the same Pillow build; PNG compression goes through Pillow's zlib, so a different zlib
implementation could in principle change the bytes (never the pixels).
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw, ImageFile, ImageFont, ImageOps, UnidentifiedImageError

from srec.db import replace_partition

# Bump when the normalisation or placeholder drawing changes: old index entries are then ignored.
NORMALIZE_VERSION = "norm-v1"
PLACEHOLDER_VERSION = "placeholder-v1"
PNG_COMPRESS_LEVEL = 6
USER_AGENT = "srec-image-fetch/1.0 (research dataset preparation; Python urllib)"
# Backoff before retry n (1-based) is RETRY_BACKOFF_S * n; tests set it to 0.
RETRY_BACKOFF_S = 0.5
# The socket timeout bounds connecting and each read; a whole body must arrive within this many timeouts.
DOWNLOAD_DEADLINE_FACTOR = 3
# After this many consecutive network-level failures against one host (no success in between),
# the remaining URLs of that host are not tried in this run (an offline machine fails fast).
HOST_FAILURE_LIMIT = 3
# Formats Image.open may identify (JPEG covers MPO); others (EPS needs Ghostscript, ...) are 'unidentified'.
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "TGA", "ICO", "AVIF")
PLACEHOLDER_MODES = ("auto", "always", "never")
STATUSES = ("ok", "missing", "invalid")

_READ_CHUNK = 64 * 1024


# --- settings and stats ------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageSettings:
    max_side: int = 512            # downscale so max(w, h) <= max_side (aspect kept, LANCZOS); never upscale
    placeholder: str = "auto"      # 'auto': placeholders when no item of the category has an image field; 'always'; 'never'
    placeholder_size: int = 96     # side of rendered placeholders
    download: bool = True          # False: URLs are recorded missing ('download disabled')
    download_timeout_s: float = 10.0  # connect and each read; a whole body within DOWNLOAD_DEADLINE_FACTOR times it
    download_retries: int = 2      # extra attempts on connection errors / 5xx / timeouts (never on 4xx)
    max_download_bytes: int = 10_000_000  # Content-Length above it, or a body growing past it: refused
    max_pixels: int = 40_000_000   # width * height above it: invalid (decompression bomb)

    def __post_init__(self) -> None:
        def need_int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"images.{name} must be an integer >= {lo}, got {v!r}")

        need_int("max_side", 1)
        need_int("placeholder_size", 16)
        need_int("download_retries", 0)
        need_int("max_download_bytes", 1)
        need_int("max_pixels", 1)
        if self.placeholder not in PLACEHOLDER_MODES:
            raise ValueError(f"images.placeholder must be one of {PLACEHOLDER_MODES}, got {self.placeholder!r}")
        if not isinstance(self.download, bool):
            raise ValueError(f"images.download must be true or false, got {self.download!r}")
        t = self.download_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
            raise ValueError(f"images.download_timeout_s must be a number > 0, got {t!r}")

    @classmethod
    def from_mapping(cls, raw: dict | None) -> ImageSettings:
        """Settings from a category's ``images:`` mapping; unknown keys and bad values raise ValueError."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"images settings must be a mapping, got {type(raw).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in raw if k not in known)
        if unknown:
            raise ValueError(f"unknown images setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}")
        return cls(**raw)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ImageStats:
    items: int = 0
    ok: int = 0
    missing: int = 0
    invalid: int = 0
    synthetic: int = 0             # ok rows that are rendered placeholders
    downloaded: int = 0            # URLs fetched over the network in this run
    download_cache_hits: int = 0   # URLs served from the download cache
    reasons: dict[str, int] = field(default_factory=dict)  # reason category -> rows (non-ok rows)

    @property
    def all_synthetic(self) -> bool:
        """Every usable image is a placeholder (and there is at least one)."""
        return self.ok > 0 and self.synthetic == self.ok

    def as_dict(self) -> dict:
        return asdict(self)


def reason_category(reason: str) -> str:
    """The stable part of a reason: what precedes the first ':'."""
    return reason.split(":", 1)[0].strip()


# --- per-item result ---------------------------------------------------------------------------

@dataclass
class _Row:
    item_id: str
    status: str
    source: str
    source_ref: str | None = None
    reason: str | None = None
    synthetic: bool = False
    image_path: str | None = None
    image_sha256: str | None = None
    width: int | None = None
    height: int | None = None
    original_mode: str | None = None
    original_width: int | None = None
    original_height: int | None = None


class _Unusable(Exception):
    """An item's image cannot be used: status ('missing' | 'invalid') and reason."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class _Normalized:
    sha256: str
    path: Path
    width: int
    height: int
    original_mode: str
    original_width: int
    original_height: int


# --- files -------------------------------------------------------------------------------------

def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class _Cache:
    """Content-addressed files under ``root``.

    downloads/<sha[:2]>/<sha>              original bytes of a downloaded URL
    downloads/index/<h[:2]>/<h>            h = sha256(url): the content sha of that URL
    normalized/<sha[:2]>/<sha>.png         normalised RGB PNG
    normalized/index/<k[:2]>/<k>.json      k = recipe key (input sha + settings): the normalised result
    """

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def download_blob(self, sha: str) -> Path:
        return self.root / "downloads" / sha[:2] / sha

    def _url_index(self, url: str) -> Path:
        h = _sha256(url.encode())
        return self.root / "downloads" / "index" / h[:2] / h

    def cached_download(self, url: str) -> bytes | None:
        idx = self._url_index(url)
        try:
            sha = idx.read_text().strip()
            data = self.download_blob(sha).read_bytes()
        except (OSError, ValueError):
            return None
        return data if _sha256(data) == sha else None

    def store_download(self, url: str, data: bytes) -> None:
        sha = _sha256(data)
        blob = self.download_blob(sha)
        if not blob.exists():
            _atomic_write(blob, data)
        _atomic_write(self._url_index(url), sha.encode())

    def normalized_file(self, sha: str) -> Path:
        return self.root / "normalized" / sha[:2] / f"{sha}.png"

    def _norm_index(self, key: str) -> Path:
        return self.root / "normalized" / "index" / key[:2] / f"{key}.json"

    def lookup_normalized(self, key: str) -> _Normalized | None:
        try:
            d = json.loads(self._norm_index(key).read_text())
            n = _Normalized(path=self.normalized_file(d["sha256"]), **d)
        except (OSError, ValueError, TypeError, KeyError):
            return None
        return n if n.path.is_file() else None

    def store_normalized(self, key: str, png: bytes, meta: dict) -> _Normalized:
        sha = _sha256(png)
        out = self.normalized_file(sha)
        if not out.is_file():
            _atomic_write(out, png)
        d = {"sha256": sha, **meta}
        _atomic_write(self._norm_index(key), json.dumps(d, sort_keys=True).encode())
        return _Normalized(path=out, **d)


# --- decoding and normalisation ----------------------------------------------------------------

@contextlib.contextmanager
def _strict_pillow():
    """Within: truncated files raise, decompression-bomb warnings raise; both restored after."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


_OPEN_FORMATS: tuple[str, ...] | None = None


def _open_formats() -> tuple[str, ...]:
    """ALLOWED_FORMATS this Pillow build can open (AVIF, for one, is optional)."""
    global _OPEN_FORMATS
    if _OPEN_FORMATS is None:
        Image.init()
        _OPEN_FORMATS = tuple(f for f in ALLOWED_FORMATS if f in Image.OPEN)
    return _OPEN_FORMATS


def _invalid(detail: str) -> _Unusable:
    return _Unusable("invalid", f"invalid image: {detail}")


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image, str, int, int]:
    """Validate and fully decode ``data``: (image, original mode, original width, original height).

    Raises ``_Unusable('invalid', ...)`` for empty, unidentified, corrupt, truncated or oversized images.
    """
    if not data:
        raise _invalid("empty file")
    with _strict_pillow():
        try:
            with Image.open(io.BytesIO(data), formats=_open_formats()) as probe:
                w, h = probe.size
                if w < 1 or h < 1:
                    raise _invalid(f"zero size {w}x{h}")
                if w * h > max_pixels:
                    raise _invalid(f"decompression bomb ({w}x{h} = {w * h} pixels > max_pixels {max_pixels})")
                probe.verify()
            im = Image.open(io.BytesIO(data), formats=_open_formats())
            mode = im.mode
            im.load()
        except _Unusable:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _invalid(f"decompression bomb ({e})") from None
        except UnidentifiedImageError:
            raise _invalid("unidentified (not an image or unsupported format)") from None
        except MemoryError:
            raise _invalid("corrupt (out of memory while decoding)") from None
        except Exception as e:  # noqa: BLE001 - decoders raise OSError, SyntaxError, struct.error, ...
            text = str(e) or type(e).__name__
            if "truncated" in text.lower():
                raise _invalid(f"truncated ({text[:200]})") from None
            raise _invalid(f"corrupt ({type(e).__name__}: {text[:200]})") from None
    return im, mode, w, h


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grey to 8-bit 'L': 16-bit values divided by 256, never clipped."""
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        out = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    else:  # 'I' (int32): 16-bit range divided by 256; anything else scaled by its own range
        a = arr.astype(np.int64)
        lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
        if lo >= 0 and hi <= 65535:
            out = (a >> 8).astype(np.uint8)
        else:
            span = max(hi - lo, 1)
            out = ((a - lo) * 255 // span).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(out), mode="L")


def _float_to_l(im: Image.Image) -> Image.Image:
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
    lo, hi = float(arr.min()), float(arr.max())
    if 0.0 <= lo and hi <= 1.0:
        out = arr * 255.0
    elif 0.0 <= lo and hi <= 255.0:
        out = arr
    else:
        out = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: alpha composited on white, CMYK converted, 16-bit scaled to 8-bit."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_l(im).convert("RGB")
    if mode == "F":
        return _float_to_l(im).convert("RGB")
    if mode == "LAB":  # Pillow's plain convert() would treat L*a*b* channels as if they were RGB
        from PIL import ImageCms  # noqa: PLC0415 (optional extension, rare mode)

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(im, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or (mode in ("P", "L", "RGB", "1") and "transparency" in im.info)
    if has_alpha:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def downscale(im: Image.Image, max_side: int) -> Image.Image:
    """Shrink so max(w, h) <= max_side keeping the aspect ratio (LANCZOS); never enlarges."""
    w, h = im.size
    if max(w, h) <= max_side:
        return im
    scale = max_side / max(w, h)
    size = (max(1, min(max_side, round(w * scale))), max(1, min(max_side, round(h * scale))))
    return im.resize(size, Image.Resampling.LANCZOS)


def png_bytes(im: Image.Image) -> bytes:
    """Deterministic PNG of an RGB image: no text, time, ICC, EXIF or dpi chunks."""
    clean = Image.frombytes("RGB", im.size, im.convert("RGB").tobytes())
    buf = io.BytesIO()
    clean.save(buf, format="PNG", optimize=False, compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _normalize_bytes(data: bytes, settings: ImageSettings, cache: _Cache) -> _Normalized:
    key = _sha256(f"{NORMALIZE_VERSION}|{settings.max_side}|{settings.max_pixels}|{_sha256(data)}".encode())
    hit = cache.lookup_normalized(key)
    if hit is not None:
        return hit
    im, mode, ow, oh = decode_image(data, settings.max_pixels)
    try:
        with _strict_pillow():
            try:
                im = ImageOps.exif_transpose(im) or im
            except Exception:  # noqa: BLE001 - a broken EXIF block only loses the orientation
                pass
            out = downscale(to_rgb(im), settings.max_side)
            png = png_bytes(out)
    except _Unusable:
        raise
    except Exception as e:  # noqa: BLE001 - a conversion Pillow cannot do is the image's fault
        raise _invalid(f"cannot convert mode {mode} to RGB ({type(e).__name__}: {str(e)[:200]})") from None
    meta = {"width": out.width, "height": out.height, "original_mode": mode,
            "original_width": ow, "original_height": oh}
    return cache.store_normalized(key, png, meta)


# --- placeholders ------------------------------------------------------------------------------

_BITMAP_FONT: ImageFont.ImageFont | None = None


def _bitmap_font() -> ImageFont.ImageFont | None:
    """Pillow's built-in bitmap font (never a system or FreeType font: identical glyphs everywhere)."""
    global _BITMAP_FONT
    if _BITMAP_FONT is None:
        loader = getattr(ImageFont, "load_default_imagefont", None)
        if loader is not None:
            _BITMAP_FONT = loader()
        else:  # Pillow < 10.1: load_default() is the bitmap font
            font = ImageFont.load_default()
            _BITMAP_FONT = font if isinstance(font, ImageFont.ImageFont) else None
    return _BITMAP_FONT


def _title_lines(title: str, font, max_width: int, max_lines: int) -> list[str]:
    words = [w for w in "".join(c if 32 <= ord(c) < 127 else " " for c in title).split() if w]
    lines: list[str] = []
    current = ""
    for word in words:
        trial = f"{current} {word}".strip()
        if font.getlength(trial) <= max_width:
            current = trial
            continue
        if current:
            lines.append(current)
        if len(lines) == max_lines:
            return lines
        while word and font.getlength(word) > max_width:
            word = word[:-1]
        current = word
    if current and len(lines) < max_lines:
        lines.append(current)
    return lines


def render_placeholder(item_id: str, title: str | None, size: int) -> Image.Image:
    """A deterministic product-like RGB image for an item: colours and shape from a hash, title words on a label."""
    h = hashlib.sha256(f"{item_id}\n{title or ''}".encode()).digest()
    bg = tuple(200 + b % 56 for b in h[0:3])
    body = tuple(40 + b % 160 for b in h[3:6])
    accent = tuple(255 - c // 2 for c in body)
    shape = h[6] % 4
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    s = size / 96.0

    def box(x0, y0, x1, y1):
        return [round(x0 * s), round(y0 * s), round(x1 * s) - 1, round(y1 * s) - 1]

    if shape == 0:  # bottle: body, shoulder, neck, cap
        d.rectangle(box(30, 30, 66, 70), fill=body)
        d.ellipse(box(30, 20, 66, 40), fill=body)
        d.rectangle(box(42, 10, 54, 24), fill=body)
        d.rectangle(box(40, 4, 56, 12), fill=accent)
    elif shape == 1:  # box: front and top faces
        d.polygon([(round(22 * s), round(24 * s)), (round(36 * s), round(12 * s)),
                   (round(80 * s), round(12 * s)), (round(66 * s), round(24 * s))], fill=accent)
        d.rectangle(box(22, 24, 66, 70), fill=body)
        d.polygon([(round(66 * s), round(24 * s)), (round(80 * s), round(12 * s)),
                   (round(80 * s), round(58 * s)), (round(66 * s), round(70 * s))], fill=tuple(c // 2 for c in body))
    elif shape == 2:  # tube: crimped end, body, cap
        d.rectangle(box(28, 6, 68, 12), fill=accent)
        d.polygon([(round(28 * s), round(12 * s)), (round(68 * s), round(12 * s)),
                   (round(60 * s), round(58 * s)), (round(36 * s), round(58 * s))], fill=body)
        d.rectangle(box(40, 58, 56, 70), fill=accent)
    else:  # jar: lid and round body
        d.rectangle(box(26, 14, 70, 26), fill=accent)
        d.rounded_rectangle(box(22, 26, 74, 70), radius=max(1, round(8 * s)), fill=body)
    # The label band with a few title words.
    d.rectangle(box(0, 72, 96, 96), fill=(250, 250, 250))
    font = _bitmap_font()
    if font is not None and title:
        line_h = 11
        max_lines = max(1, (size - round(72 * s) - 2) // line_h)
        for i, line in enumerate(_title_lines(title, font, size - 4, max_lines)):
            d.text((2, round(72 * s) + 1 + i * line_h), line, fill=(30, 30, 30), font=font)
    return im


def _placeholder(item_id: str, title: str | None, settings: ImageSettings, cache: _Cache) -> _Normalized:
    size = settings.placeholder_size
    key = _sha256(f"{PLACEHOLDER_VERSION}|{size}|{item_id}\n{title or ''}".encode())
    hit = cache.lookup_normalized(key)
    if hit is not None:
        return hit
    png = png_bytes(render_placeholder(item_id, title, size))
    meta = {"width": size, "height": size, "original_mode": "RGB", "original_width": size, "original_height": size}
    return cache.store_normalized(key, png, meta)


# --- downloads ---------------------------------------------------------------------------------

def _opener() -> urllib.request.OpenerDirector:
    """HTTP(S) only (redirects to file:// or ftp:// fail as unknown url type); proxies from the environment."""
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
                    urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor()):
        opener.add_handler(handler)
    return opener


class _Fetcher:
    """Downloads with timeout, retries, size cap and a per-host breaker; results and failures never raise."""

    def __init__(self, settings: ImageSettings, cache: _Cache):
        self.settings, self.cache = settings, cache
        self.opener = _opener()
        self.downloaded = 0
        self.cache_hits = 0
        self._failed: dict[str, _Unusable] = {}      # url -> failure, this run only
        self._host_failures: Counter[str] = Counter()  # consecutive network-level failures per host

    def fetch(self, url: str) -> bytes:
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise _Unusable("invalid", f"unsupported url scheme: {scheme or 'none'} (only http and https)")
        if not parts.hostname:
            raise _Unusable("invalid", "unsupported url: no host")
        cached = self.cache.cached_download(url)
        if cached is not None:
            self.cache_hits += 1
            return cached
        if not self.settings.download:
            raise _Unusable("missing", "download disabled")
        if url in self._failed:
            raise self._failed[url]
        host = parts.hostname.lower()
        if self._host_failures[host] >= HOST_FAILURE_LIMIT:
            raise _Unusable("missing", f"download failed: host {host} unreachable "
                                       f"(skipped after {HOST_FAILURE_LIMIT} consecutive failures)")
        try:
            data = self._download(url, host)
        except _Unusable as e:
            self._failed[url] = e
            raise
        self._host_failures[host] = 0
        self.downloaded += 1
        self.cache.store_download(url, data)
        return data

    def _download(self, url: str, host: str) -> bytes:
        attempts = 1 + self.settings.download_retries
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                time.sleep(RETRY_BACKOFF_S * (attempt - 1))
            result = self._attempt(url)
            if isinstance(result, bytes):
                return result
            if result.network:
                self._host_failures[host] += 1
            else:
                self._host_failures[host] = 0
            if not result.retry or (result.network and self._host_failures[host] >= HOST_FAILURE_LIMIT):
                break
        suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
        if result.too_large:
            raise _Unusable("invalid", f"download too large: {result.detail}")
        raise _Unusable("missing", f"download failed: {result.detail}{suffix}")

    def _attempt(self, url: str) -> bytes | _Failure:
        """One request: the body, or why not."""
        s = self.settings
        req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
        cap = s.max_download_bytes
        timeout = f"timeout after {s.download_timeout_s:g}s"
        try:
            with self.opener.open(req, timeout=s.download_timeout_s) as resp:
                length = (resp.headers.get("Content-Length") or "").strip()
                if length.isdigit() and int(length) > cap:
                    return _Failure(f"Content-Length {int(length)} > max_download_bytes {cap}", too_large=True)
                buf = bytearray()
                deadline = time.monotonic() + DOWNLOAD_DEADLINE_FACTOR * s.download_timeout_s
                while chunk := resp.read1(_READ_CHUNK):  # what has arrived, not a blocking full read
                    buf += chunk
                    if len(buf) > cap:
                        return _Failure(f"body exceeds max_download_bytes {cap}", too_large=True)
                    if time.monotonic() > deadline:  # a server trickling bytes never trips the socket timeout
                        return _Failure(f"timeout: body not complete after "
                                        f"{DOWNLOAD_DEADLINE_FACTOR * s.download_timeout_s:g}s", retry=True, network=True)
                return bytes(buf)
        except urllib.error.HTTPError as e:
            with contextlib.suppress(Exception):
                e.close()
            if 300 <= e.code < 400:  # a redirect urllib refused (to another scheme, or a loop)
                return _Failure(f"HTTP {e.code} ({str(e.msg)[:200]})")
            return _Failure(f"HTTP {e.code}", retry=e.code >= 500)
        except urllib.error.URLError as e:
            r = e.reason
            if isinstance(r, (TimeoutError, socket.timeout)):
                return _Failure(timeout, retry=True, network=True)
            if isinstance(r, socket.gaierror):  # no DNS (offline): retrying will not help
                return _Failure(f"name resolution failed ({r.strerror or r})", network=True)
            if isinstance(r, ConnectionRefusedError):
                return _Failure("connection refused", retry=True, network=True)
            if isinstance(r, OSError):
                return _Failure(f"{type(r).__name__}: {str(r)[:200]}", retry=True, network=True)
            return _Failure(str(r)[:200])  # e.g. 'unknown url type' after a redirect to file:// or ftp://
        except (TimeoutError, socket.timeout):
            return _Failure(timeout, retry=True, network=True)
        except (OSError, http.client.HTTPException) as e:  # reset, incomplete read, bad status line, ...
            return _Failure(f"{type(e).__name__}: {str(e)[:200]}", retry=True, network=True)
        except ValueError as e:  # malformed URL
            return _Failure(f"bad url ({str(e)[:200]})")


@dataclass
class _Failure:
    detail: str
    retry: bool = False      # worth another attempt (connection errors, timeouts, 5xx)
    network: bool = False    # the host could not be reached (counts towards its breaker)
    too_large: bool = False  # over max_download_bytes


# --- resolution --------------------------------------------------------------------------------

def _nonempty(v) -> str | None:
    if v is None:
        return None
    v = str(v).strip()
    return v or None


def _read_local(ref: str, items_dir: Path | None) -> tuple[bytes, Path]:
    p = Path(ref).expanduser()
    if not p.is_absolute():
        if items_dir is None:
            raise _Unusable("missing", f"file not found: {ref} (relative path and no items folder)")
        p = Path(items_dir) / p
    if not p.exists():
        raise _Unusable("missing", f"file not found: {ref}")
    if not p.is_file():
        raise _Unusable("invalid", f"unreadable file: {ref} is not a regular file")
    try:
        return p.read_bytes(), p
    except OSError as e:
        raise _Unusable("invalid", f"unreadable file: {ref} ({e.strerror or e})") from None


def _ok_row(item_id: str, source: str, ref: str | None, n: _Normalized, synthetic: bool) -> _Row:
    return _Row(item_id, "ok", source, ref, None, synthetic, str(n.path), n.sha256, n.width, n.height,
                n.original_mode, n.original_width, n.original_height)


def _resolve_real(item_id, path_ref, url_ref, items_dir, settings, cache, fetcher) -> _Row:
    """Local path first; a path that is not found falls back to the URL when there is one."""
    if path_ref is not None:
        try:
            data, _ = _read_local(path_ref, items_dir)
            return _ok_row(item_id, "path", path_ref, _normalize_bytes(data, settings, cache), False)
        except _Unusable as e:
            if not (e.status == "missing" and url_ref is not None):
                return _Row(item_id, e.status, "path", path_ref, e.reason)
    try:
        data = fetcher.fetch(url_ref)
        return _ok_row(item_id, "url", url_ref, _normalize_bytes(data, settings, cache), False)
    except _Unusable as e:
        return _Row(item_id, e.status, "url", url_ref, e.reason)


_ITEMS_SQL = """
    WITH covered AS (SELECT DISTINCT item_id FROM interactions WHERE category = $1),
    meta AS (
        SELECT item_id, title, image_url, image_path FROM raw_items WHERE category = $1
        QUALIFY row_number() OVER (PARTITION BY item_id ORDER BY source_file, source_line) = 1
    )
    SELECT c.item_id, m.item_id IS NOT NULL AS has_meta, m.title, m.image_url, m.image_path
    FROM covered c LEFT JOIN meta m ON m.item_id = c.item_id
    ORDER BY c.item_id
"""

_ARROW_SCHEMA = pa.schema([
    ("category", pa.string()), ("item_id", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("source", pa.string()), ("source_ref", pa.string()), ("synthetic", pa.bool_()),
    ("image_path", pa.string()), ("image_sha256", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_mode", pa.string()), ("original_width", pa.int32()), ("original_height", pa.int32()),
])


def resolve_item_images(
    con: duckdb.DuckDBPyConnection,
    category: str,
    *,
    items_dir: Path | None,
    settings: ImageSettings,
    cache_dir: Path,
) -> ImageStats:
    """Resolve one image per item of ``category``'s interactions and replace its ``item_images`` partition."""
    con.execute("SELECT 1").fetchall()  # DuckDB >= 2: no half-fetched result left open on this connection
    items = con.execute(_ITEMS_SQL, [category]).fetchall()
    if not items:
        raise ValueError(f"{category}: no interactions, so no items to resolve images for")
    cache = _Cache(Path(cache_dir))
    fetcher = _Fetcher(settings, cache)

    any_image = any(_nonempty(url) or _nonempty(path) for _, has_meta, _, url, path in items if has_meta)
    use_placeholders = settings.placeholder == "always" or (settings.placeholder == "auto" and not any_image)

    rows: list[_Row] = []
    for item_id, has_meta, title, url, path in items:
        item_id = str(item_id)
        url, path = _nonempty(url), _nonempty(path)
        if not has_meta:
            rows.append(_Row(item_id, "missing", "none", None, "no item metadata: not in raw_items"))
        elif use_placeholders:
            try:
                n = _placeholder(item_id, title, settings, cache)
                rows.append(_ok_row(item_id, "placeholder", None, n, True))
            except OSError as e:  # the cache folder is not writable: a real error, not an item's fault
                raise RuntimeError(f"{category}: cannot write placeholder for {item_id} under {cache.root}: {e}") from e
        elif url is None and path is None:
            rows.append(_Row(item_id, "missing", "none", None, "no image in source"))
        else:
            rows.append(_resolve_real(item_id, path, url, items_dir, settings, cache, fetcher))

    stats = ImageStats(items=len(rows), downloaded=fetcher.downloaded, download_cache_hits=fetcher.cache_hits)
    counts = Counter(r.status for r in rows)
    stats.ok, stats.missing, stats.invalid = counts["ok"], counts["missing"], counts["invalid"]
    stats.synthetic = sum(1 for r in rows if r.synthetic)
    stats.reasons = dict(sorted(Counter(reason_category(r.reason) for r in rows if r.reason).items()))
    assert set(counts) <= set(STATUSES), counts
    assert stats.items == stats.ok + stats.missing + stats.invalid, stats
    assert all((r.status == "ok") == (r.reason is None) == (r.image_path is not None) for r in rows)

    table = pa.Table.from_pylist(
        [{"category": category, **{k: getattr(r, k) for k in _ARROW_SCHEMA.names if k != "category"}} for r in rows],
        schema=_ARROW_SCHEMA,
    )
    view = "_srec_item_images_rows"
    con.register(view, table)
    try:
        written = replace_partition(con, "item_images", category, f"SELECT * FROM {view}")
    finally:
        con.unregister(view)
    if written != stats.items:
        raise RuntimeError(f"{category}: wrote {written} item_images rows for {stats.items} items")
    return stats
