"""Turn a COCO-layout folder (images + optional annotations JSON) into WebDataset shards + index.json.

Segmentation labels travel as seg.png: rasterised instance annotations (category ids, 255 on crowds), a
COCO-Stuff style label folder (--labels), or the oracle's known-truth classes (--oracle-labels).

  python jobs/make_shards.py --images coco/train2017 --annotations coco/annotations/instances_train2017.json \\
      --output s3://bkt/coco/ --prefix train --samples-per-shard 1000

Each sample holds the original image bytes and a JSON record (file name, COCO id, size, annotations).
index.json lists every shard's sample count, which the caching job checks each shard against.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run the code this script ships with

from pipeline.ingest.coco import MakeShardsConfig, run  # noqa: E402
from pipeline.options import run_command  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("make_shards", MakeShardsConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
