"""Batches of one shape, for caches written with `--resize fit` (each sample at its own aspect ratio).

    data = LabelledFeatures(cache, train)
    loader = DataLoader(data, batch_sampler=ShapeBatchSampler(data.shapes(), batch_size=8, shuffle=True, seed=0))

Every batch holds samples of one (height, width), so the default collate stacks them. With `shuffle`, each pass
shuffles the samples within each shape and then the order of the batches (a different order every pass,
reproducible from the seed); a shape's last batch may be smaller unless `drop_last`. For data-parallel
training every replica builds the same sampler with its `rank`: each takes every `replicas`-th batch of the
same order, and all get the same number of batches (up to replicas - 1 left-over batches are skipped that pass).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.utils.data


class ShapeBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Lists of dataset indices whose samples share one shape (`shapes`: (n, 2) per index)."""

    def __init__(self, shapes: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, rank: int = 0, replicas: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < replicas:
            raise ValueError(f"rank must be in [0, replicas={replicas}), got {rank}")
        self.rank, self.replicas = rank, replicas
        shapes = np.asarray(shapes).reshape(len(shapes), -1)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        _, group = np.unique(shapes, axis=0, return_inverse=True)
        order = np.argsort(group.reshape(-1), kind="stable")
        bounds = np.nonzero(np.diff(group.reshape(-1)[order]))[0] + 1
        self.groups: list[np.ndarray] = [g for g in np.split(order, bounds) if len(g)]
        self._passes = 0

    def _batches(self, rng: np.random.Generator | None) -> list[np.ndarray]:
        batches = []
        for members in self.groups:
            members = rng.permutation(members) if rng is not None else members
            for start in range(0, len(members), self.batch_size):
                batch = members[start: start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if rng is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches[self.rank: len(batches) - len(batches) % self.replicas: self.replicas]

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self._passes]) if self.shuffle else None
        self._passes += 1
        for batch in self._batches(rng):
            yield [int(i) for i in batch]

    def __len__(self) -> int:
        if self.drop_last:
            return sum(len(g) // self.batch_size for g in self.groups) // self.replicas
        return sum(-(-len(g) // self.batch_size) for g in self.groups) // self.replicas
