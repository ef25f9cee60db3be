"""srec.images: local files, downloads (a local HTTP server), validation, conversion, placeholders."""
from __future__ import annotations

import hashlib
import http.server
import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import srec.images as images
from srec.db import ensure_tables
from srec.images import ImageSettings, ImageStats, render_placeholder, resolve_item_images, to_rgb
from srec.schemas import validate_partition

# Real Amazon Beauty items (../shared/data/amazon-beauty/item_titles.csv).
BEAUTY = [
    ("7806397051", "WAWO 15 Color Professionl Makeup Eyeshadow Camouflage Facial Concealer Neutral Palette"),
    ("9759091062", "Xtreme Brite Brightening Gel 1oz."),
    ("9788072216", "Prada Candy By Prada Eau De Parfum Spray 1.7 Oz For Women"),
    ("9790790961", "Versace Bright Crystal Eau de Toilette Spray for Women, 3 Ounce"),
    ("9790794231", "Stella McCartney Stella"),
    ("B00004TMFE", "Avalon Biotin B-Complex Thickening Conditioner, 14 Ounce"),
    ("B00004TUBL", "Better Living Classic Two Chamber Dispenser, White"),
    ("B00004TUBV", "Better Living The Ulti-Mate Dispenser"),
    ("B00004U9UY", "Crabtree  and  Evelyn 2792 Gardeners Hand Therapy (100ml, 3.4 oz)"),
    ("B00004U9V2", "Crabtree  and  Evelyn - Gardener's Ultra-Moisturising Hand Therapy Pump - 250g/8.8 OZ"),
    ("B000050B6U", "Instant Heat Curling Iron, 1-Inch"),
    ("B000050FDE", "Andis 1875-Watt Fold-N-Go Ionic Hair Dryer, Silver/Black (80020)"),
]
CAT = "beauty_img"


@pytest.fixture(autouse=True)
def _fast_and_direct(monkeypatch):
    """No retry backoff; no proxy between the client and the 127.0.0.1 test server."""
    monkeypatch.setattr(images, "RETRY_BACKOFF_S", 0.0)
    for key in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(key, raising=False)
    yield
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def setup_items(con, items: list[dict], extra_interaction_items: tuple[str, ...] = (), category: str = CAT):
    """raw_items rows (item_id, title, image_url, image_path) and one interaction per item."""
    ensure_tables(con)
    for line, it in enumerate(items, 1):
        con.execute(
            "INSERT INTO raw_items (category, item_id, title, image_url, image_path, source_file, source_line) "
            "VALUES (?, ?, ?, ?, ?, 'meta.json', ?)",
            [category, it["item_id"], it.get("title"), it.get("image_url"), it.get("image_path"), line],
        )
    ids = [it["item_id"] for it in items] + list(extra_interaction_items)
    for pos, item_id in enumerate(ids):
        # Two interactions for the first item: the table covers DISTINCT items.
        for rep in range(2 if pos == 0 else 1):
            con.execute(
                "INSERT INTO interactions (category, user_id, item_id, rating, timestamp, position, label, seq_index, split) "
                "VALUES (?, ?, ?, 5.0, ?, ?, 1, 0, 'train')",
                [category, f"U{pos}_{rep}", item_id, 1_400_000_000 + pos, pos],
            )


def rows(con, category: str = CAT) -> dict[str, dict]:
    cur = con.execute("SELECT * FROM item_images WHERE category = ? ORDER BY item_id", [category])
    cols = [d[0] for d in cur.description]
    return {r["item_id"]: r for r in (dict(zip(cols, row)) for row in cur.fetchall())}


def check_partition(con, stats: ImageStats, category: str = CAT) -> None:
    assert stats.items == stats.ok + stats.missing + stats.invalid
    (n,) = con.execute("SELECT count(*) FROM item_images WHERE category = ?", [category]).fetchall()[0]
    assert n == stats.items
    outcome = validate_partition(con, "item_images", category)
    assert outcome.passed, outcome.failure_cases


def resolve(con, tmp_path: Path, category: str = CAT, items_dir: Path | None = None, cache: str = "cache", **kw) -> ImageStats:
    return resolve_item_images(con, category, items_dir=items_dir or tmp_path / "items",
                               settings=ImageSettings(**kw), cache_dir=tmp_path / cache)


def save(im: Image.Image, path: Path, fmt: str = "PNG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt, **kw)
    return path


def encoded(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


# --- settings -----------------------------------------------------------------------------------

def test_settings_from_mapping():
    assert ImageSettings.from_mapping({}) == ImageSettings() == ImageSettings.from_mapping(None)
    s = ImageSettings.from_mapping({"max_side": 256, "placeholder": "never", "download_timeout_s": 2})
    assert (s.max_side, s.placeholder, s.download_timeout_s) == (256, "never", 2)
    with pytest.raises(ValueError, match="unknown images setting.*'max_sid'"):
        ImageSettings.from_mapping({"max_sid": 256})
    with pytest.raises(ValueError, match="images.placeholder"):
        ImageSettings.from_mapping({"placeholder": "sometimes"})
    with pytest.raises(ValueError, match="images.max_side"):
        ImageSettings.from_mapping({"max_side": 0})
    with pytest.raises(ValueError, match="images.download_retries"):
        ImageSettings.from_mapping({"download_retries": True})
    with pytest.raises(ValueError, match="images.download_timeout_s"):
        ImageSettings.from_mapping({"download_timeout_s": -1})
    with pytest.raises(ValueError, match="images.download "):
        ImageSettings.from_mapping({"download": "yes"})


# --- local files: conversion, downscaling ------------------------------------------------------

def test_local_modes_converted_to_rgb(con, tmp_path):
    d = tmp_path / "items"
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))                            # transparent -> white
    la = Image.new("LA", (4, 4), (50, 0))                          # fully transparent grey -> white
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    cmyk = Image.new("CMYK", (4, 4), (0, 0, 0, 0))                 # no ink -> white
    cmyk.putpixel((0, 0), (0, 255, 255, 0))                        # magenta + yellow -> red
    i16 = Image.new("I;16", (4, 4), 65535)
    i16.putpixel((0, 0), 32768)
    files = {
        "7806397051": save(rgba, d / "rgba.png"),
        "9759091062": save(la, d / "la.png"),
        "9788072216": save(pal, d / "pal.png", transparency=0),
        "9790790961": save(cmyk, d / "cmyk.jpg", "JPEG", quality=95),
        "9790794231": save(i16, d / "i16.png"),
        "B00004TMFE": save(Image.new("L", (4, 4), 77), d / "grey.png"),
        "B00004TUBL": save(Image.new("1", (4, 4), 1), d / "bw.png"),
        "B00004TUBV": save(Image.new("RGB", (4, 4), (1, 2, 3)), d / "rgb.png"),
    }
    titles = dict(BEAUTY)
    setup_items(con, [{"item_id": i, "title": titles[i], "image_path": p.name} for i, p in files.items()])
    stats = resolve(con, tmp_path)
    check_partition(con, stats)
    assert (stats.ok, stats.synthetic, stats.downloaded) == (8, 0, 0)
    got = rows(con)

    def px(item_id, xy):
        r = got[item_id]
        assert r["status"] == "ok" and r["source"] == "path" and r["synthetic"] is False
        with Image.open(r["image_path"]) as im:
            assert im.mode == "RGB" and im.size == (4, 4)
            return im.getpixel(xy)

    assert px("7806397051", (0, 0)) == (255, 255, 255) and px("7806397051", (1, 1)) == (10, 20, 30)
    assert px("9759091062", (2, 2)) == (255, 255, 255)
    assert px("9788072216", (0, 0)) == (255, 255, 255) and px("9788072216", (1, 1)) == (200, 10, 10)
    white, red = px("9790790961", (3, 3)), px("9790790961", (0, 0))
    assert min(white) >= 245 and red[0] >= 200 and max(red[1:]) <= 60
    assert px("9790794231", (1, 1)) == (255, 255, 255) and px("9790794231", (0, 0)) == (128, 128, 128)
    assert px("B00004TMFE", (0, 0)) == (77, 77, 77)
    assert px("B00004TUBL", (0, 0)) == (255, 255, 255)
    assert px("B00004TUBV", (0, 0)) == (1, 2, 3)
    modes = {i: got[i]["original_mode"] for i in files}
    assert modes["7806397051"] == "RGBA" and modes["9790790961"] == "CMYK" and modes["9788072216"] == "P"
    assert modes["9790794231"].startswith("I")  # I;16 (or I, depending on the Pillow PNG reader)
    for r in got.values():
        digest = hashlib.sha256(Path(r["image_path"]).read_bytes()).hexdigest()
        assert r["image_sha256"] == digest and r["image_path"].endswith(f"/normalized/{digest[:2]}/{digest}.png")
        assert Path(r["image_path"]).is_absolute() and r["reason"] is None


def test_sixteen_bit_scaled_not_clipped():
    for mode in ("I;16", "I;16B", "I"):
        im = Image.new(mode, (3, 1), 0)
        for x, v in enumerate((65535, 256, 255)):
            im.putpixel((x, 0), v)
        out = to_rgb(im)
        assert out.mode == "RGB"
        assert [out.getpixel((x, 0))[0] for x in range(3)] == [255, 1, 0], mode


def test_lab_converted_colorimetrically():
    assert max(to_rgb(Image.new("LAB", (1, 1), (0, 128, 128))).getpixel((0, 0))) <= 3
    assert min(to_rgb(Image.new("LAB", (1, 1), (255, 128, 128))).getpixel((0, 0))) >= 252


def test_downscale_keeps_aspect_and_never_upscales(con, tmp_path):
    d = tmp_path / "items"
    setup_items(con, [
        {"item_id": "B00004U9UY", "image_path": str(save(noise(1000, 500), d / "wide.png"))},  # absolute path
        {"item_id": "B00004U9V2", "image_path": save(noise(300, 900, 1), d / "tall.jpg", "JPEG").name},
        {"item_id": "B000050B6U", "image_path": save(noise(40, 20, 2), d / "small.png").name},
    ])
    stats = resolve(con, tmp_path, max_side=100)
    check_partition(con, stats)
    got = rows(con)
    dims = {i: (r["width"], r["height"], r["original_width"], r["original_height"]) for i, r in got.items()}
    assert dims == {"B00004U9UY": (100, 50, 1000, 500), "B00004U9V2": (33, 100, 300, 900),
                    "B000050B6U": (40, 20, 40, 20)}
    for r in got.values():
        with Image.open(r["image_path"]) as im:
            assert im.size == (r["width"], r["height"])


# --- invalid and missing files -----------------------------------------------------------------

def test_invalid_images_are_rows_not_exceptions(con, tmp_path):
    d = tmp_path / "items"
    d.mkdir()
    jpeg, png = encoded(noise(64, 64), "JPEG", quality=90), encoded(noise(64, 64))
    (d / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "cut.png").write_bytes(png[: len(png) // 2])
    (d / "random.jpg").write_bytes(np.random.default_rng(3).bytes(5000))
    (d / "empty.png").write_bytes(b"")
    save(Image.new("1", (8000, 6000)), d / "bomb.png")  # 48 Mpx, a few kB on disk
    (d / "folder.png").mkdir()
    setup_items(con, [
        {"item_id": "7806397051", "image_path": "cut.jpg"},
        {"item_id": "9759091062", "image_path": "cut.png"},
        {"item_id": "9788072216", "image_path": "random.jpg"},
        {"item_id": "9790790961", "image_path": "empty.png"},
        {"item_id": "9790794231", "image_path": "bomb.png"},
        {"item_id": "B00004TMFE", "image_path": "no/such/file.png"},
        {"item_id": "B00004TUBL", "image_path": "folder.png"},
    ])
    stats = resolve(con, tmp_path, max_pixels=1_000_000)
    check_partition(con, stats)
    got = rows(con)
    reason = {i: r["reason"] for i, r in got.items()}
    assert reason["7806397051"].startswith("invalid image: truncated")
    assert reason["9759091062"].startswith("invalid image: truncated")
    assert reason["9788072216"].startswith("invalid image: unidentified")
    assert reason["9790790961"] == "invalid image: empty file"
    assert reason["9790794231"].startswith("invalid image: decompression bomb (8000x6000")
    assert reason["B00004TMFE"] == "file not found: no/such/file.png"
    assert reason["B00004TUBL"].startswith("unreadable file:")
    status = {i: r["status"] for i, r in got.items()}
    assert status["B00004TMFE"] == "missing" and status.pop("B00004TMFE") and set(status.values()) == {"invalid"}
    assert all(r["image_path"] is None and r["image_sha256"] is None for r in got.values())
    assert (stats.ok, stats.missing, stats.invalid) == (0, 1, 6)
    assert stats.reasons == {"file not found": 1, "invalid image": 5, "unreadable file": 1}


def test_pillow_bomb_error_is_invalid_even_above_max_pixels(con, tmp_path, monkeypatch):
    """Pillow's own guard (a global this module never changes) also ends as 'invalid', not an exception."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises above 2x, warns above 1x
    d = tmp_path / "items"
    setup_items(con, [{"item_id": "7806397051", "image_path": save(Image.new("L", (40, 40)), d / "a.png").name},
                      {"item_id": "9759091062", "image_path": save(Image.new("L", (30, 40)), d / "b.png").name}])
    stats = resolve(con, tmp_path)
    check_partition(con, stats)
    assert stats.invalid == 2
    assert all(r["reason"].startswith("invalid image: decompression bomb") for r in rows(con).values())


# --- downloads ---------------------------------------------------------------------------------

class _Server:
    def __init__(self, routes: dict):
        self.routes, self.hits = routes, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                server.hits[path] = server.hits.get(path, 0) + 1
                server.user_agent = self.headers.get("User-Agent")
                route = server.routes.get(path)
                if route is None:
                    self.send_error(404)
                    return
                route(self, server.hits[path])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _body(data: bytes, length: int | None = -1, status: int = 200):
    def send(h, n):
        h.send_response(status)
        h.send_header("Content-Type", "image/png")
        if length is not None:
            h.send_header("Content-Length", str(len(data) if length == -1 else length))
        h.end_headers()
        try:
            h.wfile.write(data)
        except OSError:
            pass
    return send


PNG = encoded(noise(30, 20, 7))


@pytest.fixture
def server():
    def flaky(h, n):  # 500 once, then the image
        (_body(b"oops", status=500) if n == 1 else _body(PNG))(h, n)

    def slow(h, n):
        time.sleep(1.0)
        _body(PNG)(h, n)

    def trickle(h, n):  # a byte every 50 ms: no read ever times out, the whole body does
        h.send_response(200)
        h.end_headers()
        for _ in range(40):
            try:
                h.wfile.write(b"x")
                h.wfile.flush()
            except OSError:
                return
            time.sleep(0.05)

    big = np.random.default_rng(5).bytes(50_000)
    s = _Server({
        "/img.png": _body(PNG),
        "/same.png": _body(PNG),
        "/flaky.png": flaky,
        "/always500.png": _body(b"down", status=500),
        "/big-nolength.png": _body(big, length=None),
        "/big-declared.png": _body(b"x", length=10**9),
        "/slow.png": slow,
        "/trickle.png": trickle,
        "/notimage.png": _body(b"<html>not an image</html>"),
        "/to-file": lambda h, n: (h.send_response(302), h.send_header("Location", "file:///etc/passwd"),
                                  h.send_header("Content-Length", "0"), h.end_headers()),
    })
    yield s
    s.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_downloads(con, tmp_path, server):
    b = server.base
    refused = f"http://127.0.0.1:{_closed_port()}/x.png"
    urls = {
        "7806397051": f"{b}/img.png",
        "9759091062": f"{b}/missing.png",
        "9788072216": f"{b}/flaky.png",
        "9790790961": f"{b}/always500.png",
        "9790794231": f"{b}/big-nolength.png",
        "B00004TMFE": f"{b}/big-declared.png",
        "B00004TUBL": f"{b}/slow.png",
        "B00004TUBV": f"{b}/notimage.png",
        "B00004U9UY": refused,
        "B00004U9V2": "ftp://example.com/a.png",
        "B000050B6U": "file:///etc/hostname",
        "B000050FDE": f"{b}/to-file",
    }
    setup_items(con, [{"item_id": i, "image_url": u} for i, u in urls.items()])
    t0 = time.perf_counter()
    stats = resolve(con, tmp_path, download_timeout_s=0.3, download_retries=1, max_download_bytes=20_000)
    elapsed = time.perf_counter() - t0
    check_partition(con, stats)
    got = rows(con)
    st = {i: (r["status"], r["reason"]) for i, r in got.items()}
    assert st["7806397051"] == ("ok", None) and got["7806397051"]["source_ref"] == urls["7806397051"]
    assert got["7806397051"]["source"] == "url" and (got["7806397051"]["width"], got["7806397051"]["height"]) == (30, 20)
    assert st["9759091062"] == ("missing", "download failed: HTTP 404")
    assert st["9788072216"] == ("ok", None)
    assert st["9790790961"] == ("missing", "download failed: HTTP 500 (after 2 attempts)")
    assert st["9790794231"][0] == "invalid" and "max_download_bytes 20000" in st["9790794231"][1]
    assert st["B00004TMFE"] == ("invalid", "download too large: Content-Length 1000000000 > max_download_bytes 20000")
    assert st["B00004TUBL"][0] == "missing" and st["B00004TUBL"][1].startswith("download failed: timeout after 0.3s")
    assert st["B00004TUBV"][0] == "invalid" and st["B00004TUBV"][1].startswith("invalid image: unidentified")
    assert st["B00004U9UY"][0] == "missing" and st["B00004U9UY"][1].startswith("download failed: connection refused")
    assert st["B00004U9V2"] == ("invalid", "unsupported url scheme: ftp (only http and https)")
    assert st["B000050B6U"] == ("invalid", "unsupported url scheme: file (only http and https)")
    assert st["B000050FDE"][0] == "missing" and st["B000050FDE"][1].startswith("download failed: HTTP 302")
    assert "not allowed" in st["B000050FDE"][1]
    # 404 is not retried; 500 is (once, download_retries=1); flaky succeeded on its second request.
    assert server.hits["/missing.png"] == 1 and server.hits["/always500.png"] == 2 and server.hits["/flaky.png"] == 2
    assert server.user_agent.startswith("srec-image-fetch/")
    assert (stats.downloaded, stats.download_cache_hits) == (3, 0)  # img, flaky, notimage
    assert stats.reasons == {"download failed": 5, "download too large": 2, "invalid image": 1,
                             "unsupported url scheme": 2}
    assert elapsed < 8, elapsed
    cache = tmp_path / "cache" / "downloads"
    sha = hashlib.sha256(PNG).hexdigest()
    assert (cache / sha[:2] / sha).read_bytes() == PNG

    # Second run: served from the cache, failures tried again (they are never cached).
    hits_before = dict(server.hits)
    stats2 = resolve(con, tmp_path, download_timeout_s=0.3, download_retries=0, max_download_bytes=20_000)
    check_partition(con, stats2)
    assert stats2.download_cache_hits == 3 and stats2.downloaded == 0
    assert server.hits["/img.png"] == hits_before["/img.png"] and server.hits["/flaky.png"] == hits_before["/flaky.png"]
    assert server.hits["/missing.png"] == hits_before["/missing.png"] + 1
    assert rows(con)["7806397051"]["image_sha256"] == got["7806397051"]["image_sha256"]


def test_download_disabled_and_shared_urls(con, tmp_path, server):
    setup_items(con, [{"item_id": "7806397051", "image_url": f"{server.base}/img.png"},
                      {"item_id": "9759091062", "image_url": f"{server.base}/img.png"},
                      {"item_id": "9788072216", "image_url": f"{server.base}/same.png"}])
    stats = resolve(con, tmp_path, download=False)
    check_partition(con, stats)
    assert {r["reason"] for r in rows(con).values()} == {"download disabled"} and stats.missing == 3
    assert server.hits == {}
    stats = resolve(con, tmp_path)
    check_partition(con, stats)
    # One request per distinct URL; the repeated URL is a cache hit; identical bytes share one file.
    assert (stats.ok, stats.downloaded, stats.download_cache_hits) == (3, 2, 1)
    assert server.hits == {"/img.png": 1, "/same.png": 1}
    assert len({r["image_path"] for r in rows(con).values()}) == 1
    # Cached downloads are used even with downloading switched off.
    stats = resolve(con, tmp_path, download=False)
    assert (stats.ok, stats.download_cache_hits) == (3, 3)


def test_unreachable_host_fails_fast(con, tmp_path):
    port = _closed_port()
    setup_items(con, [{"item_id": i, "image_url": f"http://127.0.0.1:{port}/{i}.jpg"} for i, _ in BEAUTY])
    t0 = time.perf_counter()
    stats = resolve(con, tmp_path, download_retries=2)
    check_partition(con, stats)
    assert time.perf_counter() - t0 < 5
    assert stats.missing == len(BEAUTY) and stats.reasons == {"download failed": len(BEAUTY)}
    reasons = [r["reason"] for r in rows(con).values()]
    assert sum("unreachable (skipped after" in r for r in reasons) >= len(BEAUTY) - images.HOST_FAILURE_LIMIT


# --- placeholders, mixed sources, missing metadata ---------------------------------------------

def test_placeholders_when_no_item_has_images(con, tmp_path):
    setup_items(con, [{"item_id": i, "title": t} for i, t in BEAUTY])
    stats = resolve(con, tmp_path)
    check_partition(con, stats)
    assert (stats.ok, stats.synthetic, stats.missing, stats.invalid) == (len(BEAUTY), len(BEAUTY), 0, 0)
    assert stats.all_synthetic and stats.reasons == {}
    first = rows(con)
    assert all(r["source"] == "placeholder" and r["synthetic"] and r["source_ref"] is None for r in first.values())
    assert all((r["width"], r["height"], r["original_mode"]) == (96, 96, "RGB") for r in first.values())
    assert len({r["image_sha256"] for r in first.values()}) == len(BEAUTY)  # different items differ
    # Rendered again from scratch (another cache): identical bytes.
    stats2 = resolve(con, tmp_path, cache="cache2")
    second = rows(con)
    assert {i: r["image_sha256"] for i, r in first.items()} == {i: r["image_sha256"] for i, r in second.items()}
    for i in first:
        assert Path(first[i]["image_path"]).read_bytes() == Path(second[i]["image_path"]).read_bytes()
    assert stats2 == stats
    a = render_placeholder("B00004TMFE", "Avalon Biotin", 96)
    assert a.tobytes() == render_placeholder("B00004TMFE", "Avalon Biotin", 96).tobytes()
    assert a.tobytes() != render_placeholder("B00004TMFE", "Avalon Biotin B", 96).tobytes()


def test_placeholder_modes_and_mixed_sources(con, tmp_path):
    d = tmp_path / "items"
    save(noise(20, 20), d / "a.png")
    items = [{"item_id": i, "title": t} for i, t in BEAUTY[:4]]
    items[0]["image_path"] = "a.png"
    items[1]["image_url"] = "   "  # blank: no image
    setup_items(con, items, extra_interaction_items=("B000050FDE",))
    # auto: some items have images -> no placeholders; the others are missing.
    stats = resolve(con, tmp_path)
    check_partition(con, stats)
    got = rows(con)
    assert got["7806397051"]["status"] == "ok" and got["7806397051"]["source"] == "path"
    for i in ("9759091062", "9788072216", "9790790961"):
        assert (got[i]["status"], got[i]["source"], got[i]["reason"]) == ("missing", "none", "no image in source")
    assert got["B000050FDE"]["status"] == "missing" and got["B000050FDE"]["reason"].startswith("no item metadata")
    assert (stats.items, stats.ok, stats.missing, stats.synthetic) == (5, 1, 4, 0)
    assert stats.reasons == {"no image in source": 3, "no item metadata": 1}
    # always: every item with metadata gets a placeholder, real images included.
    stats = resolve(con, tmp_path, placeholder="always")
    check_partition(con, stats)
    assert (stats.ok, stats.synthetic, stats.missing) == (4, 4, 1)
    # never: nothing rendered even with no image anywhere.
    con.execute("UPDATE raw_items SET image_path = NULL")
    stats = resolve(con, tmp_path, placeholder="never")
    check_partition(con, stats)
    assert (stats.ok, stats.missing, stats.reasons) == (0, 5, {"no image in source": 4, "no item metadata": 1})


def test_partition_replaced_and_other_categories_kept(con, tmp_path):
    setup_items(con, [{"item_id": i, "title": t} for i, t in BEAUTY[:3]])
    setup_items(con, [{"item_id": i, "title": t} for i, t in BEAUTY[3:5]], category="other")
    resolve(con, tmp_path)
    resolve(con, tmp_path, category="other")
    resolve(con, tmp_path)
    counts = dict(con.execute("SELECT category, count(*) FROM item_images GROUP BY 1").fetchall())
    assert counts == {CAT: 3, "other": 2}
    with pytest.raises(ValueError, match="no interactions"):
        resolve(con, tmp_path, category="nothing_here")


def test_relative_path_without_items_dir(con, tmp_path):
    setup_items(con, [{"item_id": "7806397051", "image_path": "a.png"}])
    stats = resolve_item_images(con, CAT, items_dir=None, settings=ImageSettings(), cache_dir=tmp_path / "c")
    check_partition(con, stats)
    assert rows(con)["7806397051"]["reason"].startswith("file not found: a.png")


def test_path_not_found_falls_back_to_url(con, tmp_path, server):
    d = tmp_path / "items"
    save(noise(10, 10), d / "here.png")
    setup_items(con, [
        {"item_id": "7806397051", "image_path": "gone.png", "image_url": f"{server.base}/img.png"},
        {"item_id": "9759091062", "image_path": "here.png", "image_url": f"{server.base}/same.png"},
    ])
    stats = resolve(con, tmp_path)
    check_partition(con, stats)
    got = rows(con)
    assert (got["7806397051"]["source"], got["7806397051"]["source_ref"]) == ("url", f"{server.base}/img.png")
    assert (got["9759091062"]["source"], got["9759091062"]["source_ref"]) == ("path", "here.png")
    assert server.hits == {"/img.png": 1} and (stats.ok, stats.downloaded) == (2, 1)


def test_trickling_body_hits_the_overall_deadline(con, tmp_path, server):
    setup_items(con, [{"item_id": "7806397051", "image_url": f"{server.base}/trickle.png"}])
    t0 = time.perf_counter()
    stats = resolve(con, tmp_path, download_timeout_s=0.2, download_retries=0)
    assert time.perf_counter() - t0 < 1.5
    check_partition(con, stats)
    assert rows(con)["7806397051"]["reason"] == "download failed: timeout: body not complete after 0.6s"
