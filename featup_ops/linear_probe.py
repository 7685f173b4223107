"""Linear segmentation probes on frozen features: the standard way to measure what dense features know.

A probe is a 1x1 convolution from C feature channels to K classes, trained with cross-entropy on pixels
whose label is not `ignore_index`; it reports pixel accuracy and mean IoU on held-out data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


class LinearProbe(nn.Module):
    """Per-pixel linear classifier: (B, C, H, W) features -> (B, K, H, W) class scores."""

    def __init__(self, dim: int, classes: int):
        super().__init__()
        self.dim, self.classes = dim, classes
        self.classifier = nn.Conv2d(dim, classes, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)


@dataclass
class SegmentationScore:
    """Pixel accuracy and mIoU from a confusion matrix (rows: truth, columns: prediction)."""

    confusion: torch.Tensor

    @property
    def pixel_accuracy(self) -> float:
        total = self.confusion.sum()
        return float(self.confusion.diag().sum() / total) if total > 0 else 0.0

    @property
    def per_class_iou(self) -> list[float | None]:
        """IoU per class; None for a class that appears neither in the truth nor the predictions."""
        tp = self.confusion.diag().double()
        union = self.confusion.sum(0).double() + self.confusion.sum(1).double() - tp
        return [float(t / u) if u > 0 else None for t, u in zip(tp, union)]

    @property
    def miou(self) -> float:
        present = [iou for iou, n in zip(self.per_class_iou, self.confusion.sum(1)) if n > 0 and iou is not None]
        return sum(present) / len(present) if present else 0.0

    def as_dict(self) -> dict:
        return {"pixel_accuracy": self.pixel_accuracy, "miou": self.miou, "per_class_iou": self.per_class_iou}


def update_confusion(confusion: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> None:
    """Adds a batch's predictions (argmax of scores) against labels, skipping ignored and out-of-range pixels."""
    classes = confusion.shape[0]
    pred = scores.argmax(1).flatten()
    truth = labels.flatten()
    keep = (truth != ignore_index) & (truth >= 0) & (truth < classes)
    idx = truth[keep] * classes + pred[keep]
    confusion += torch.bincount(idx, minlength=classes * classes).reshape(classes, classes).to(confusion.device)


def evaluate(probe: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], classes: int,
             ignore_index: int = 255, device: str | torch.device = "cpu") -> SegmentationScore:
    confusion = torch.zeros(classes, classes, dtype=torch.int64)
    probe.eval()
    with torch.no_grad():
        for feats, labels in batches:
            update_confusion(confusion, probe(feats.to(device).float()).cpu(), labels, ignore_index)
    return SegmentationScore(confusion)


@dataclass
class ProbeTrainingConfig:
    epochs: int = 10
    lr: float = 1e-2
    weight_decay: float = 1e-4
    ignore_index: int = 255
    device: str = "cpu"


@dataclass
class ProbeResult:
    probe: LinearProbe
    train_losses: list[float] = field(default_factory=list)
    score: SegmentationScore | None = None
    seconds: float = 0.0
    pixels_seen: int = 0
    images_seen: int = 0


def train_probe(train_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]], dim: int, classes: int,
                config: ProbeTrainingConfig, val_batches: Callable[[], Iterable] | None = None,
                probe: nn.Module | None = None, on_step: Callable[[int, float], None] | None = None) -> ProbeResult:
    """Trains a linear probe; `train_batches(epoch)` yields (features (B,C,H,W), labels (B,H,W)) batches.

    Pass `probe` to train a wrapped module (e.g. DistributedDataParallel); the result holds the bare probe.
    """
    bare = LinearProbe(dim, classes).to(config.device) if probe is None else probe
    model = bare
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result = ProbeResult(probe=getattr(bare, "module", bare))
    t0 = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        model.train()
        running, count = 0.0, 0
        for feats, labels in train_batches(epoch):
            feats = feats.to(config.device, non_blocking=True).float()
            labels = labels.to(config.device, non_blocking=True).long()
            logits = model(feats)
            loss = F.cross_entropy(logits, labels, ignore_index=config.ignore_index)
            if not torch.isfinite(loss):  # a batch with only ignored pixels
                if model is bare:
                    continue
                # data-parallel: every rank must take part in each step's gradient all-reduce; this one adds zeros
                loss = logits.sum() * 0.0
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running, count, step = running + float(loss.detach()), count + 1, step + 1
            result.images_seen += feats.shape[0]
            result.pixels_seen += int((labels != config.ignore_index).sum())
            if on_step is not None:
                on_step(step, float(loss.detach()))
        result.train_losses.append(running / max(count, 1))
    result.seconds = time.perf_counter() - t0
    if val_batches is not None:
        result.score = evaluate(result.probe, val_batches(), classes, config.ignore_index, config.device)
    return result
