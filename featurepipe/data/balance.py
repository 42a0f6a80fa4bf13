"""Class imbalance, one of two ways: a loss weight per class (the default), or batches drawn balanced
(--sampler balanced), which needs no weights."""

from __future__ import annotations

import numpy as np
import torch


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """n / (K * n_c): every class weighs as much in the loss as it would in a balanced set."""
    return len(labels) / (n_classes * np.maximum(np.bincount(labels, minlength=n_classes), 1))


class BalancedSampler(torch.utils.data.Sampler):
    """Draws every class equally often (with replacement); an epoch keeps the data set's length.

    Under torchrun every rank draws the same epoch (one seed, set per epoch through `generator`) and
    keeps its own interleaved share of it, so the ranks' shares are disjoint and together balanced.
    """

    def __init__(self, labels: np.ndarray, n_classes: int, rank: int = 0, world: int = 1) -> None:
        counts = np.bincount(labels, minlength=n_classes)
        self.weights = torch.as_tensor(1.0 / np.maximum(counts, 1), dtype=torch.float64)[torch.as_tensor(labels)]
        self.rank, self.world, self.num_samples = rank, world, len(labels) // world
        self.generator = torch.Generator()

    def __iter__(self):
        drawn = torch.multinomial(self.weights, self.num_samples * self.world, replacement=True,
                                  generator=self.generator)
        return iter(drawn[self.rank::self.world].tolist())

    def __len__(self) -> int:
        return self.num_samples
