"""Real photographs shipped inside installed packages (scikit-image), as WebDataset samples.

Used by the caching job's embedded demo, the tests and the benchmarks: no downloads, real image statistics.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
from PIL import Image

# Colour photographs, then greyscale ones (kept single-channel in the shards: the decoder must cope).
COLOR_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
GRAY_PHOTOS = ("camera", "coins", "moon", "clock", "grass", "gravel", "brick", "page", "text")


def photo(name: str) -> np.ndarray:
    """One scikit-image sample photograph as uint8, (H,W,3) colour or (H,W) greyscale."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype != np.uint8:
        arr = (arr * 255).astype(np.uint8) if arr.max() <= 1 else arr.astype(np.uint8)
    return arr


def encode(arr: np.ndarray, fmt: str = "jpeg", quality: int = 92) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    img.save(buf, format=fmt.upper(), **({"quality": quality} if fmt.lower() in ("jpeg", "jpg") else {}))
    return buf.getvalue()


def photo_samples(names: tuple[str, ...] = COLOR_PHOTOS + GRAY_PHOTOS, fmt: str = "jpg") -> Iterator[dict]:
    """WebDataset samples {"__key__", "jpg"|"png", "json"} for the named photographs."""
    for name in names:
        arr = photo(name)
        ext = "jpg" if fmt in ("jpg", "jpeg") else fmt
        yield {"__key__": name, ext: encode(arr, "jpeg" if ext == "jpg" else ext),
               "json": json.dumps({"source": f"skimage.data.{name}", "height": arr.shape[0], "width": arr.shape[1]})}
