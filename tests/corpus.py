"""A corpus of awkward real-world inputs, built from real photographs: what a COCO-scale crawl contains."""

from __future__ import annotations

import io
import json

import numpy as np
from PIL import Image

from pipeline.ingest.sample_photos import encode, photo


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 300x200 (w x h) photo crop stored sideways with EXIF orientation 6: upright it is 200 wide, 300 tall."""
    upright = Image.fromarray(photo("astronaut")[:300, :200])  # 200 wide x 300 tall
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes: pixels sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    return _jpeg(stored, exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    gray = photo("camera").astype(np.uint16) * 257  # full 16-bit range
    return _png(Image.fromarray(gray))  # uint16 -> mode I;16


def bomb_png() -> bytes:
    """A tiny file that decodes to ~90 MP: above PIL's default decompression-bomb threshold."""
    return _png(Image.new("1", (9500, 9500)))


GOOD_KINDS = ("photo_jpeg", "gray_png", "cmyk_jpeg", "rgba_png", "sixteen_bit_png", "exif_rotated", "palette_png")
BAD_KINDS = ("corrupt", "truncated_jpeg", "unsupported_format", "tiny", "huge", "no_image", "empty_file")


def corpus_samples() -> list[dict]:
    """WebDataset samples, one per kind, keyed by kind. GOOD_KINDS decode; BAD_KINDS each get an error row."""
    coffee = photo("coffee")
    full_jpeg = encode(coffee)
    rgba = np.dstack([photo("chelsea"), np.full(photo("chelsea").shape[:2], 128, np.uint8)])
    samples = {
        "photo_jpeg": {"jpg": full_jpeg},
        "gray_png": {"png": _png(Image.fromarray(photo("coins")))},
        "cmyk_jpeg": {"jpg": _jpeg(Image.fromarray(photo("rocket")).convert("CMYK"))},
        "rgba_png": {"png": _png(Image.fromarray(rgba, "RGBA"))},
        "sixteen_bit_png": {"png": sixteen_bit_png()},
        "exif_rotated": {"jpg": exif_rotated_jpeg()},
        "palette_png": {"png": _png(Image.fromarray(photo("astronaut")).convert("P"))},
        "corrupt": {"jpg": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))},
        "truncated_jpeg": {"jpg": full_jpeg[: len(full_jpeg) // 2]},
        "unsupported_format": {"heic": b"\x00\x00\x00\x18ftypheic" + bytes(100)},
        "tiny": {"png": _png(Image.new("RGB", (8, 8), (200, 10, 10)))},
        "huge": {"png": bomb_png()},
        "no_image": {"json": json.dumps({"note": "annotation without its image"})},
        "empty_file": {"jpg": b""},
    }
    return [{"__key__": key, **entries, "json": entries.get("json", json.dumps({"kind": key}))}
            for key, entries in samples.items()]
