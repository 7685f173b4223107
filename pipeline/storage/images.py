"""Decoding a sample's image robustly and preparing it for the backbone: resize + centre crop (`crop`, the
paper's square protocol) or the whole image at its own aspect ratio (`fit`).

Every way an image can be bad becomes a `SampleError` with a reason a person can act on; nothing here
raises anything else for bad bytes. The resize and crop geometry is returned so labels can be aligned later.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "ppm", "pgm", "gif")
UNSUPPORTED_IMAGE_EXTENSIONS = ("heic", "heif", "avif", "svg", "jp2", "jxl", "psd", "raw", "cr2", "nef", "dng")
DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb threshold (~ 89 MP)
DEFAULT_MIN_SIDE = 16
RESIZE_MODES = ("crop", "fit")  # see resize_and_crop and fit_shape


class SampleError(ValueError):
    """A sample that cannot be turned into an image; the message is the manifest's `error`."""


@dataclass(frozen=True)
class Geometry:
    """How the stored features map back to the original image.

    The image (orig_height x orig_width, after EXIF orientation) was resized to resized_height x
    resized_width (scale_y = resized_height / orig_height, scale_x likewise), then the window
    [crop_top : crop_top+crop_height, crop_left : crop_left+crop_width] kept: the model's input. `crop`
    keeps a crop_size x crop_size centre square; `fit` keeps the whole resized image (offsets 0, crop_size None).
    """

    orig_height: int
    orig_width: int
    orig_mode: str
    exif_orientation: int
    resized_height: int
    resized_width: int
    crop_top: int
    crop_left: int
    crop_size: int | None
    crop_height: int = 0  # 0: crop_size (a square window)
    crop_width: int = 0
    resize: str = "crop"

    def __post_init__(self) -> None:
        if not self.crop_height:
            object.__setattr__(self, "crop_height", self.crop_size)
        if not self.crop_width:
            object.__setattr__(self, "crop_width", self.crop_size)

    @property
    def scale_y(self) -> float:
        return self.resized_height / self.orig_height

    @property
    def scale_x(self) -> float:
        return self.resized_width / self.orig_width

    def as_dict(self) -> dict:
        return {**asdict(self), "scale_y": self.scale_y, "scale_x": self.scale_x}


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


DRAFT_GAP = 4  # JPEGs are decoded reduced (1/2, 1/4, 1/8) only while the shorter side stays >= this x target


def _open_rgb(data: bytes, max_pixels: int, min_side: int, target: int | None = None
              ) -> tuple[Image.Image, str, int, tuple[int, int]]:
    """Bytes -> (upright RGB PIL image, original mode, EXIF orientation, upright full-size (height, width)).

    With `target`, a JPEG whose shorter side is at least 2 * DRAFT_GAP * target is decoded at a reduced
    scale by libjpeg (Image.draft) that keeps its shorter side >= DRAFT_GAP * target: 3-10x less decode
    work on large photos, and the bicubic resize that follows still reduces by DRAFT_GAP or more, so the
    result stays within a level or so of the full decode (measured on photographs: mean |difference| <= 0.3,
    at most 3 levels, 11 on fine vessels at 64 px; tests/test_inputs.py)."""
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
            if target is not None and img.format == "JPEG" and min(width, height) >= 2 * DRAFT_GAP * target:
                keep = DRAFT_GAP * target / min(width, height)  # draft keeps both sides >= the size asked
                img.draft(img.mode, (int(width * keep + 0.999), int(height * keep + 0.999)))
            img.load()
            mode = img.mode
            orientation = int(img.getexif().get(0x0112, 1) or 1)
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
    upright = (width, height) if orientation in (5, 6, 7, 8) else (height, width)
    return rgb, mode, orientation, upright


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
                 ) -> tuple[np.ndarray, str, int]:
    """Bytes -> (H, W, 3) uint8 RGB upright (EXIF orientation applied), the original PIL mode and the EXIF
    orientation (1 = as stored)."""
    rgb, mode, orientation, _ = _open_rgb(data, max_pixels, min_side)
    return np.asarray(rgb, dtype=np.uint8), mode, orientation


def fit_shape(height: int, width: int, size: int, multiple: int = 1) -> tuple[int, int]:
    """(height, width) of about size x size pixels with the aspect ratio of height x width, each side a multiple
    of `multiple` (the backbone's patch): the shorter side is rounded to a multiple, the longer one follows the
    aspect ratio (rounded too, so it is kept to within half a patch on the longer side)."""
    if min(height, width, size, multiple) < 1:
        raise ValueError(f"fit_shape needs positive sizes, got {height}x{width}, size {size}, multiple {multiple}")
    scale = size / math.sqrt(height * width)
    short, long = sorted((height, width))
    s = max(multiple, math.floor(short * scale / multiple + 0.5) * multiple)  # halves round up
    side = max(s, math.floor(s * long / short / multiple + 0.5) * multiple)
    return (s, side) if height <= width else (side, s)


def _prepare(img: Image.Image, size: int, full_hw: tuple[int, int], mode: str, orientation: int,
             resize: str = "crop", multiple: int = 1) -> tuple[np.ndarray, Geometry]:
    """`img` (possibly decoded reduced, see _open_rgb) of an upright full_hw image -> resized (+ cropped)."""
    h, w = full_hw
    if resize == "fit":
        rh, rw = fit_shape(h, w, size, multiple)
        out = np.asarray(img.resize((rw, rh), Image.BICUBIC, reducing_gap=None), dtype=np.uint8)
        return out, Geometry(h, w, mode, orientation, rh, rw, 0, 0, None, rh, rw, "fit")
    if resize != "crop":
        raise ValueError(f"resize {resize!r} is not one of {', '.join(RESIZE_MODES)}")
    scale = size / min(h, w)
    rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (rh - size) // 2, (rw - size) // 2
    resized = img.resize((rw, rh), Image.BICUBIC, reducing_gap=None)
    out = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.uint8)
    return out, Geometry(h, w, mode, orientation, rh, rw, top, left, size)


def resize_and_crop(rgb: np.ndarray, size: int, mode: str = "?", orientation: int = 1) -> tuple[np.ndarray, Geometry]:
    """Shorter side -> `size` (bicubic, antialiased), then the central size x size window.

    The FeatUp training preprocessing (Resize(size) + CenterCrop(size)). Returns (size, size, 3) uint8.
    """
    return _prepare(Image.fromarray(rgb), size, rgb.shape[:2], mode, orientation)


def resize_to_fit(rgb: np.ndarray, size: int, multiple: int = 1, mode: str = "?", orientation: int = 1
                  ) -> tuple[np.ndarray, Geometry]:
    """The whole image resized (bicubic, antialiased) to `fit_shape`: about size x size pixels, its own aspect
    ratio, sides multiples of `multiple`; nothing is cut off and nothing padded."""
    return _prepare(Image.fromarray(rgb), size, rgb.shape[:2], mode, orientation, "fit", multiple)


def load_sample_image(sample: dict, size: int, max_pixels: int = DEFAULT_MAX_PIXELS,
                      min_side: int = DEFAULT_MIN_SIDE, resize: str = "crop", multiple: int = 1
                      ) -> tuple[np.ndarray, Geometry]:
    """A webdataset sample -> (uint8 image, geometry); SampleError when unusable. `resize`: "crop" gives
    (size, size, 3), "fit" the whole image at about size x size pixels (sides multiples of `multiple`)."""
    _, data = find_image(sample)
    img, mode, orientation, full_hw = _open_rgb(data, max_pixels, min_side, target=size)
    return _prepare(img, size, full_hw, mode, orientation, resize, multiple)


# -- segmentation labels ------------------------------------------------------------------------------------
LABEL_EXTENSIONS = ("seg.png", "label.png", "labels.png", "mask.png")
# EXIF orientation -> the PIL transpose that makes a stored-orientation array upright.
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                   5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}


def images_to_tensor(images: np.ndarray | list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 RGB images (B,H,W,3), as an array or a list -> float (B,3,H,W) in [0,1] on `device`
    (moved as uint8, a quarter of the bytes, and converted there)."""
    import torch  # here, so that decoding alone (make_shards) does not load torch

    batch = torch.from_numpy(np.stack(images) if isinstance(images, list) else images)
    return batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)


def find_label(sample: dict) -> bytes | None:
    for ext in LABEL_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    return None


def decode_label(data: bytes) -> np.ndarray:
    """A single-channel class-id PNG (8 or 16 bit, or palette indices) -> (H, W) uint16."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (OSError, ValueError, SyntaxError) as exc:
        raise SampleError(f"label is not a readable image: {exc}") from None
    if img.mode not in ("L", "P", "I;16", "I;16B", "I;16L", "I", "1"):
        raise SampleError(f"label image has mode {img.mode}: expected single-channel class ids (L, P or 16-bit)")
    arr = np.asarray(img)
    if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
        raise SampleError("label class ids must lie in 0..65535")
    return arr.astype(np.uint16)


def _nearest(arr: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Nearest-neighbour resize sampling pixel centres (the same mapping bilinear/bicubic resizes use)."""
    h, w = arr.shape
    rows = np.minimum(((np.arange(out_h) + 0.5) * h / out_h).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(out_w) + 0.5) * w / out_w).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]


def align_label(label: np.ndarray, geometry: Geometry, out_hw: tuple[int, int]) -> np.ndarray:
    """A label map of the original image -> the stored features' grid: same EXIF turn, resize and crop as
    the image (nearest neighbour), then to the feature resolution. Returns (out_h, out_w) uint16."""
    g = geometry
    if label.shape != (g.orig_height, g.orig_width):
        turn = _EXIF_TRANSPOSE.get(g.exif_orientation)
        if turn is not None:
            label = np.asarray(Image.fromarray(label).transpose(turn))
    if label.shape != (g.orig_height, g.orig_width):
        raise SampleError(f"label is {label.shape[1]}x{label.shape[0]} but the image is {g.orig_width}x{g.orig_height}")
    resized = _nearest(label, g.resized_height, g.resized_width)
    crop = resized[g.crop_top : g.crop_top + g.crop_height, g.crop_left : g.crop_left + g.crop_width]
    return _nearest(crop, *out_hw)
