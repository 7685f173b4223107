"""Cache FeatUp high-resolution features for a WebDataset image corpus (the `ray job submit` entrypoint).

  ray job submit --working-dir . -- python jobs/upsample_coco.py \\
      --input 's3://bkt/coco/train-{000000..000123}.tar' --output s3://bkt/feats/dinov2_jbu.zarr \\
      --backbone dinov2 --upsampler jbu --upsampler-weights s3://bkt/ckpt/dinov2_jbu.ckpt

  # AnyUp, any backbone, no training: the published multi-backbone weights (or --upsampler-weights PATH|URL)
  ... --backbone dinov2 --upsampler anyup

With no arguments it runs the embedded demo: shards built from scikit-image's sample photographs, a
local Ray instance, output under ./demo_output/.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run the code this script ships with

from pipeline.caching.demo import demo_config  # noqa: E402
from pipeline.caching.driver import JobFailed, run_job  # noqa: E402
from pipeline.caching.job_config import JobConfig  # noqa: E402
from pipeline.caching.lease import LeaseLost  # noqa: E402
from pipeline.options import ConfigError, parse_config  # noqa: E402
from pipeline.storage.credentials import redact_logs  # noqa: E402

log = logging.getLogger("upsample_coco")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    redact_logs()
    argv = sys.argv[1:] if argv is None else argv
    try:
        if not argv:
            config = demo_config(Path.cwd() / "demo_output")
            log.info("no arguments: running the embedded demo (sample photographs -> %s)", config.output)
        else:
            config = parse_config(JobConfig, argv, description=__doc__)
        summary = run_job(config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except (JobFailed, LeaseLost) as exc:
        log.error("%s", exc)
        return 1
    print(f"\ncached {summary.ok} images ({summary.errors} errors, {len(summary.shard_errors)} damaged shards, "
          f"{summary.shards_skipped} shards resumed) in {summary.seconds:.1f}s")
    print(f"features: {config.output}  (manifest: {config.output.rstrip('/')}/manifest.parquet)")
    print("read back with: from pipeline.reading.feature_cache import FeatureCache; cache = FeatureCache("
          f"{config.output!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
