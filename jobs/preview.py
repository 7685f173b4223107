"""Render PCA previews (image | low-res | high-res features, first three components as RGB) of cached samples.

  python jobs/preview.py --cache ./demo_output/features.zarr --key astronaut --key coffee --out ./previews

  # add a panel per upsampler re-run on the cached low-res features and image (here AnyUp's published weights)
  python jobs/preview.py --cache ./demo_output/features.zarr --key astronaut --upsampler anyup
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run the code this script ships with

from pipeline.options import run_command  # noqa: E402
from pipeline.reading.previews import PreviewConfig, run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("preview", PreviewConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
