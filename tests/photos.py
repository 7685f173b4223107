"""Real photographs for the method's tests, straight from scikit-image (no pipeline code involved)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def photo(name: str) -> np.ndarray:
    """A scikit-image sample photograph as uint8 RGB (H, W, 3); greyscale ones are repeated to three channels."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    if arr.dtype != np.uint8:
        arr = (arr * 255).astype(np.uint8) if arr.max() <= 1 else arr.astype(np.uint8)
    return np.stack([arr] * 3, -1) if arr.ndim == 2 else arr[..., :3]


def photos(names: tuple[str, ...], size: int) -> torch.Tensor:
    """(N, 3, size, size) float images in [0, 1]: shorter side resized to `size` (bicubic), centre crop."""
    out = []
    for name in names:
        img = Image.fromarray(photo(name))
        w, h = img.size
        scale = size / min(h, w)
        rw, rh = max(size, round(w * scale)), max(size, round(h * scale))
        img = img.resize((rw, rh), Image.BICUBIC)
        left, top = (rw - size) // 2, (rh - size) // 2
        arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out)
