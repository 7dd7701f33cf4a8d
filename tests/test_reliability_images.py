"""Hostile images as the server reads them (server/vision.py `load_image`, the function the
explainImage handler runs): real decompression bombs, odd formats, and paths that try to
leave the workspace. Each is refused with an ImageRequestError / ImageError or decoded to
RGB; none crashes, hangs or reads outside the allowed folders. (Byte-level cases that
tests/test_vision.py already covers are not repeated; tests/e2e/test_faults.py sends these
through the running server.)"""

from __future__ import annotations

import base64
import functools
import io
import os
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pytest
from codevista.models.vision.image import ImageError
from codevista.server.vision import ImageRequestError, load_image
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bomb(side: int = 30000) -> bytes:
    """A complete, valid 1-bit PNG of side x side black pixels: ~110 MB of rows that deflate
    to ~110 KB; decoded as RGB it would take 2.7 GB."""
    comp = zlib.compressobj(9)
    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts.append(comp.compress(row * (side % 1000)) + comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts))
            + _chunk(b"IEND", b""))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50,
                   loop=0)
    return buf.getvalue()


# name -> (bytes, None if it decodes, else a phrase of the error)
@functools.cache
def hostile_bytes() -> dict[str, tuple[bytes, str | None]]:
    png = encode(Image.new("RGB", (64, 48), (10, 200, 30)), "PNG")
    return {
        "non_image_bytes": (b"#!/bin/sh\nrm -rf ~\n" * 50, "not an image"),
        "elf_binary": (b"\x7fELF\x02\x01\x01" + bytes(500), "not an image"),
        "svg": (b'<svg xmlns="http://www.w3.org/2000/svg"><script>x</script></svg>',
                "not an image"),
        "truncated_png": (png[: len(png) * 2 // 3], "truncated"),
        "png_bad_header_crc": (png[:30] + bytes([png[30] ^ 0xFF]) + png[31:], "not an image"),
        "decompression_bomb_30000": (png_bomb(), "pixels"),
        "animated_gif": (animated_gif(), None),
        "cmyk_jpeg": (encode(Image.new("CMYK", (20, 10), (0, 200, 200, 0)), "JPEG"), None),
        "png_16_bit": (encode(Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8)
                                              * 1000), "PNG"), None),
        "one_pixel": (encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), None),
        "tiff_not_allowed": (encode(Image.new("RGB", (4, 4)), "TIFF"), "not an image"),
    }


@pytest.mark.parametrize("name", list(hostile_bytes()))
def test_hostile_image_bytes(name, tmp_path):
    data, error = hostile_bytes()[name]
    rss = psutil.Process().memory_info().rss
    t0 = time.monotonic()
    for spec in ({"data": base64.b64encode(data).decode()}, {"path": "img.bin"}):
        (tmp_path / "img.bin").write_bytes(data)
        if error is None:
            img, _ = load_image(spec, [tmp_path])
            assert img.mode == "RGB" and img.width >= 1 and img.height >= 1
        else:
            with pytest.raises((ImageError, ImageRequestError)) as info:
                load_image(spec, [tmp_path])
            assert error in str(info.value) or (name == "truncated_png"
                                                and "cannot be read" in str(info.value))
    assert time.monotonic() - t0 < 10
    assert psutil.Process().memory_info().rss - rss < 500 << 20  # the bomb was not decoded


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    ws = tmp_path / "ws"
    (ws / "shots").mkdir(parents=True)
    ok = encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")
    (ws / "shots" / "ok.png").write_bytes(ok)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(ok)
    evil = tmp_path / "ws-evil"  # shares the workspace's name as a prefix
    evil.mkdir()
    (evil / "x.png").write_bytes(ok)
    os.symlink(outside / "secret.png", ws / "shots" / "file_link.png")
    os.symlink(outside, ws / "dir_link")
    os.symlink("/dev/zero", ws / "zero.png")
    os.mkfifo(ws / "pipe.png")
    with open(ws / "sparse.png", "wb") as f:  # 1 GB that takes no disk
        f.truncate(1 << 30)
    return {"ws": ws, "outside": outside, "evil": evil}


def test_paths_and_uris_stay_inside_the_workspace(workspace):
    ws, outside, evil = workspace["ws"], workspace["outside"], workspace["evil"]
    refused = [
        {"path": "../outside/secret.png"},
        {"path": "../../../../../../../etc/passwd"},
        {"path": "shots/../../outside/secret.png"},
        {"path": "shots/file_link.png"},
        {"path": "dir_link/secret.png"},
        {"path": str(outside / "secret.png")},
        {"path": str(evil / "x.png")},
        {"path": "~/.ssh/id_rsa"},
        {"uri": (outside / "secret.png").as_uri()},
        {"uri": ws.as_uri() + "/..%2F..%2Foutside/secret.png"},
        {"uri": ws.as_uri() + "/%2e%2e/outside/secret.png"},
        {"uri": "file://otherhost" + str(ws / "shots" / "ok.png")},
        {"uri": "http://127.0.0.1/ok.png"},
        {"uri": "data:image/png;base64,AAAA"},
        {"path": "zero.png"},
        {"path": "pipe.png"},
        {"path": "sparse.png"},
        {"path": "shots"},
        {"path": "shots/missing.png"},
        {"path": "shots/ok.png\x00.txt"},
        {"path": ""},
        {"data": "A" * (50 << 20)},
        {"uri": ["not", "a", "string"]},
        {"path": "shots/ok.png", "data": "AAAA"},
        "shots/ok.png",
        None,
    ]
    t0 = time.monotonic()
    for spec in refused:
        with pytest.raises((ImageRequestError, ImageError, ValueError)) as info:
            load_image(spec, [ws])
        assert str(info.value), spec
    assert time.monotonic() - t0 < 10  # the FIFO, /dev/zero and 1 GB file were not read
    img, source = load_image({"path": "shots/ok.png"}, [ws])
    assert img.size == (8, 8) and source.label == "ok.png"
    assert load_image({"uri": (ws / "shots" / "ok.png").as_uri()}, [ws])[0].size == (8, 8)
    # a folder the user allowed is readable, through its own symlink too
    assert load_image({"path": "dir_link/secret.png"}, [ws, outside])[0].size == (8, 8)
