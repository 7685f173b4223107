"""Render PCA previews (image | low-res | high-res features, first three components as RGB) of cached samples.

  python jobs/preview.py --cache ./demo_output/features.zarr --key astronaut --key coffee --out ./previews
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run the code this script ships with

from pipeline.previews import write_previews  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", required=True, help="feature cache (local or fsspec URL)")
    p.add_argument("--key", action="append", help="sample key to render; repeat (default: the first --count)")
    p.add_argument("--count", type=int, default=4, help="how many samples when no --key is given")
    p.add_argument("--out", help="folder for the PNGs (default: <cache>/previews)")
    p.add_argument("--storage-options", type=json.loads, default={}, metavar="JSON", help="fsspec options as JSON")
    a = p.parse_args(argv)
    try:
        paths = write_previews(a.cache, a.key, a.count, a.out, a.storage_options)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
