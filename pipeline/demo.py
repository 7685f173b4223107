"""Real photographs shipped inside installed packages (scikit-image), as WebDataset samples.

Used by the job's embedded demo, the tests and the benchmarks: no downloads, real image statistics.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

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


def demo_config(root: Path, shards: int = 2):
    """The job's embedded default: sample photographs as local shards, oracle backbone, local output.

    The oracle backbone needs no weights; the upsampler is the JBU stack trained for it and shipped with
    featup_ops when present, else bilinear (said in the log).
    """
    from .config import JobConfig
    from .shard_writer import write_shards

    names = COLOR_PHOTOS + GRAY_PHOTOS
    shard_dir = root / "shards"
    if not (shard_dir / "index.json").exists():
        write_shards(photo_samples(names), str(shard_dir), samples_per_shard=-(-len(names) // shards), prefix="photos")
    weights = shipped_oracle_jbu()
    return JobConfig(inputs=(str(shard_dir / "photos-*.tar"),), output=str(root / "features.zarr"),
                     backbone="oracle", upsampler="jbu" if weights else "bilinear", upsampler_weights=weights,
                     image_size=224, batch_size=4, overwrite=True)


def shipped_oracle_jbu() -> str | None:
    """Path of the JBU stack trained for the oracle backbone that ships inside featup_ops, if installed."""
    import featup_ops

    path = Path(featup_ops.__file__).parent / "weights" / "oracle_jbu.safetensors"
    return str(path) if path.exists() else None
