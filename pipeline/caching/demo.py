"""The caching job's embedded default: scikit-image's sample photographs as local shards, the weights-free
`oracle` backbone with the JBU stack trained for it (shipped inside featup_ops), output on local disk."""

from __future__ import annotations

from pathlib import Path

from featup_ops import shipped_oracle_jbu
from pipeline.caching.job_config import JobConfig
from pipeline.ingest.sample_photos import COLOR_PHOTOS, GRAY_PHOTOS, photo_samples
from pipeline.ingest.shard_writer import write_shards


def demo_config(root: Path, shards: int = 2) -> JobConfig:
    """Writes the sample shards under `root/shards` (once) and returns the job that caches them."""
    names = COLOR_PHOTOS + GRAY_PHOTOS
    shard_dir = root / "shards"
    if not (shard_dir / "index.json").exists():
        write_shards(photo_samples(names), str(shard_dir), samples_per_shard=-(-len(names) // shards), prefix="photos")
    return JobConfig(inputs=(str(shard_dir / "photos-*.tar"),), output=str(root / "features.zarr"),
                     backbone="oracle", upsampler="jbu", upsampler_weights=shipped_oracle_jbu(),
                     image_size=224, batch_size=4, overwrite=True)
