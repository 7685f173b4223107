"""Decoding a sample's image robustly and preparing it for the backbone (resize + centre crop).

Every way an image can be bad becomes a `SampleError` with a reason a person can act on; nothing here
raises anything else for bad bytes. The crop geometry is returned so labels can be aligned later.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")
UNSUPPORTED_IMAGE_EXTENSIONS = ("heic", "heif", "avif", "svg", "jp2", "jxl", "psd", "raw", "cr2", "nef", "dng")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ 89 MP)
DEFAULT_MIN_SIDE = 16


class SampleError(ValueError):
    """A sample that cannot be turned into an image; the message is the manifest's `error`."""


@dataclass(frozen=True)
class Geometry:
    """How the stored features map back to the original image.

    The image (orig_height x orig_width, after EXIF orientation) was resized to resized_height x
    resized_width, then the window [crop_top : crop_top+crop_size, crop_left : crop_left+crop_size] kept.
    """

    orig_height: int
    orig_width: int
    orig_mode: str
    resized_height: int
    resized_width: int
    crop_top: int
    crop_left: int
    crop_size: int

    def as_dict(self) -> dict:
        return asdict(self)


def find_image(sample: dict) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image entry, or a SampleError saying what is there instead."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext, sample[ext]
    entries = sorted(k for k in sample if not k.startswith("__"))
    unsupported = [k for k in entries if k.rsplit(".", 1)[-1] in UNSUPPORTED_IMAGE_EXTENSIONS]
    if unsupported:
        raise SampleError(f"unsupported image format {unsupported[0]!r}; supported: {', '.join(IMAGE_EXTENSIONS)}")
    raise SampleError(f"no image in sample (entries: {', '.join(entries) or 'none'})")


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. High bit depths are rescaled, not clipped; alpha is composited on white."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        if img.mode == "F":
            lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
            arr, hi = arr - lo, max(hi - lo, 1e-12)
        gray = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, LAB, HSV


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
                 ) -> tuple[np.ndarray, str]:
    """Bytes -> (H, W, 3) uint8 RGB upright (EXIF orientation applied), and the original PIL mode."""
    if not data:
        raise SampleError("empty image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise SampleError(f"image is {width}x{height} = {width * height / 1e6:.0f} MP, above the "
                                  f"{max_pixels / 1e6:.0f} MP decompression-bomb limit (raise --max-pixels if intended)")
            if min(width, height) < min_side:
                raise SampleError(f"image is {width}x{height}, smaller than the minimum side of {min_side} px")
            img.load()
            mode = img.mode
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except SampleError:
        raise
    except UnidentifiedImageError:
        raise SampleError("not a decodable image (unknown or corrupt format)") from None
    except Image.DecompressionBombError as exc:
        raise SampleError(f"decompression bomb: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise SampleError(f"corrupt image: {exc}") from None
    return np.asarray(rgb, dtype=np.uint8), mode


def resize_and_crop(rgb: np.ndarray, size: int, mode: str = "?") -> tuple[np.ndarray, Geometry]:
    """Shorter side -> `size` (bicubic, antialiased), then the central size x size window.

    The FeatUp training preprocessing (Resize(size) + CenterCrop(size)). Returns (size, size, 3) uint8.
    """
    h, w = rgb.shape[:2]
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    img = Image.fromarray(rgb).resize((rw, rh), Image.BICUBIC, reducing_gap=None)
    top, left = (rh - size) // 2, (rw - size) // 2
    out = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return out, Geometry(h, w, mode, rh, rw, top, left, size)


def load_sample_image(sample: dict, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                      min_side: int = DEFAULT_MIN_SIDE) -> tuple[np.ndarray, Geometry]:
    """A webdataset sample -> ((size, size, 3) uint8 image, geometry); SampleError when unusable."""
    _, data = find_image(sample)
    rgb, mode = decode_image(data, max_pixels=max_pixels, min_side=min_side)
    return resize_and_crop(rgb, size, mode)
