"""Turn a COCO-layout folder (images + optional annotations JSON) into WebDataset shards + index.json.

Segmentation labels travel as seg.png: rasterised instance annotations (category ids, 255 on crowds), a
COCO-Stuff style label folder (--labels), or the oracle's known-truth classes (--oracle-labels).

  python jobs/make_shards.py --images coco/train2017 --annotations coco/annotations/instances_train2017.json \\
      --output s3://bkt/coco/ --prefix train --samples-per-shard 1000

Each sample holds the original image bytes and a JSON record (file name, COCO id, size, annotations).
index.json lists every shard's sample count, which the caching job checks each shard against.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run the code this script ships with

from tqdm.auto import tqdm  # noqa: E402

from pipeline.coco import coco_samples  # noqa: E402
from pipeline.shard_writer import write_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, help="folder of images (local or fsspec URL), searched recursively")
    p.add_argument("--annotations", help="COCO instances JSON; its annotations go into each sample's json")
    p.add_argument("--output", required=True, help="folder for the shards and index.json (local or fsspec URL)")
    p.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar (default 'shard')")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="default 1000")
    p.add_argument("--only-annotated", action="store_true", help="skip images the annotations do not list")
    p.add_argument("--labels", help="COCO-Stuff style folder of <image stem>.png class maps, stored as seg.png")
    p.add_argument("--oracle-labels", action="store_true",
                   help="attach known-truth labels of the oracle backbone (8 classes) to every image")
    p.add_argument("--no-rasterize", action="store_true",
                   help="do not rasterise instance annotations into a seg.png category map")
    p.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON", help="fsspec options as JSON")
    args = p.parse_args(argv)
    samples = coco_samples(args.images, args.annotations, args.storage_options,
                           include_unannotated=not args.only_annotated, labels=args.labels,
                           rasterize_annotations=not args.no_rasterize, oracle_labels=args.oracle_labels)
    index = write_shards(tqdm(samples, unit="img", desc="sharding"), args.output, args.samples_per_shard,
                         args.prefix, args.storage_options)
    print(f"wrote {index['total_samples']} samples in {len(index['shards'])} shards to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
