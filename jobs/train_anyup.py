"""Train AnyUp (one upsampler for every backbone) on WebDataset shards against oracles with a known truth.

    python jobs/train_anyup.py --input 'data/train-{000000..000009}.tar' --output runs/anyup \
        --backbone-seed 2 --backbone-seed 3 --backbone-seed 4 --backbone-dim 16 --backbone-dim 48 \
        --patch-size 4 --patch-size 8 --image-size 64 --steps 1000 --time-limit 20

Every --backbone-seed x --backbone-dim x --patch-size combination of the `oracle` backbone (the features of
a different, exactly known backbone each) is a training backbone; one is drawn per step and AnyUp's output is
fitted to its exact high-res features (AnyUp, Wimmer et al., ICLR 2026: its loss and regularisers).
--output is a folder: model.safetensors (AnyUp's published key layout; featup_ops.load_anyup(folder) loads
it strictly; the training record in its metadata) and summary.json (steps, wall time, machine load, losses).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run the code this script ships with

from pipeline.options import run_command  # noqa: E402
from pipeline.workflows.train_anyup_on_shards import AnyUpTrainJobConfig, run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("train_anyup", AnyUpTrainJobConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
