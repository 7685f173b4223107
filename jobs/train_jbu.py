"""Train a FeatUp JBU upsampler for any registered backbone on WebDataset shards (local or s3://).

    python jobs/train_jbu.py --input 'data/train-{000000..000009}.tar' --backbone dinov2 \
        --output s3://bucket/jbu/dinov2 --steps 2000 --batch-size 4 --image-size 224

    # data-parallel on a Ray cluster (Ray Train TorchTrainer), same script:
    ray job submit --working-dir . -- python jobs/train_jbu.py ... --num-workers 8 --use-gpu

Frozen backbone, multi-view consistency loss, the reference recipe by default (FeatUp, Fu et al., ICLR 2024).
--output is a folder (local or fsspec URL): model.safetensors (load with featup_ops.load_jbu; pass the
folder or the file to jobs/upsample_coco.py --upsampler-weights), training_state.safetensors (resume
with --resume), preview.png (image | low-res | high-res features, PCA colours) and summary.json.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run the code this script ships with

from pipeline.options import run_command  # noqa: E402
from pipeline.workflows.train_on_shards import TrainJobConfig, run  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    return run_command("train_jbu", TrainJobConfig, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
