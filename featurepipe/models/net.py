"""`Net`: a feature extractor and a linear head that bring uint8 images to their input range themselves."""

from __future__ import annotations

import torch
from torch import nn

from featurepipe.data.intensity import FULL_RANGE
from featurepipe.models.embedding import pooled_last_blocks, tta_views


class Net(nn.Module):
    def __init__(self, features: nn.Module, dim: int, num_classes: int, mean: list[float], std: list[float],
                 dropout: float = 0.3, window: tuple[float, float] = FULL_RANGE, arch: str | None = None) -> None:
        super().__init__()
        self.arch = arch  # its registry entry's name (Grad-CAM asks it for its layer)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # Not in the state dict (older checkpoints have none): the checkpoint's meta carries it.
        self.window = (float(window[0]), float(window[1]))
        self.features = features
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, num_classes))
        self.embedding_dim = dim

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels → [0, 1] through the intensity window (see data.intensity): a data set exported
        with grey levels 0-2 reaches the model as 0, 0.5 and 1, wherever the image comes from."""
        if x.dtype != torch.uint8:
            return x
        lo, hi = self.window
        if (lo, hi) == FULL_RANGE:
            return x.float().div_(255.0)
        return x.float().sub_(lo).div_(hi - lo).clamp_(0.0, 1.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale(x) - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def logits(self, x: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """The CNN's logits, averaged over `tta` views (models.embedding): the head is linear, so the head
        of the mean embedding is the mean of the views' logits."""
        return self(x) if tta == "none" else self.head(self.embed(x, tta=tta))

    def embed(self, x: torch.Tensor, layer: str = "penultimate", tta: str = "none") -> torch.Tensor:
        """The features heads are fitted on (see models.embedding): `layer`, averaged over `tta` views.

        With the default layer, `self.head(self.embed(x, tta=...))` is the CNN's TTA logits: the mean
        of the views' logits, as the head is linear.
        """
        views = tta_views(self.normalize(x), tta)
        # Summed in fp32: under bf16 autocast each of up to ten additions would round to 8 bits.
        total = sum(self._pooled(v, layer).float() for v in views)
        return total / len(views)

    def _pooled(self, x: torch.Tensor, layer: str) -> torch.Tensor:
        if layer == "penultimate":
            return self.features(x)
        return torch.cat(pooled_last_blocks(self.features, x, 2), dim=1)

    @torch.no_grad()
    def embed_dim(self, layer: str, img_size: int) -> int:
        if layer == "penultimate":
            return self.embedding_dim
        x = torch.zeros(1, self.mean.shape[1], img_size, img_size, dtype=torch.uint8, device=self.mean.device)
        training = self.training
        self.eval()  # a forward in train mode would move BatchNorm's running statistics
        try:
            return int(self.embed(x, layer).shape[1])
        finally:
            self.train(training)
