"""Losses of the papers: CE, weighted CE (1 - class frequency, or inverse frequency), focal."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def class_weights(counts, scheme: str) -> np.ndarray:
    """Per-class weights from training-set counts.

    "one_minus_cf": w_c = 1 - n_c / N            (Sun et al., WCE(1-CF))
    "inverse_cf":   w_c = N / (K * n_c)          (inverse class frequency, mean weight 1 when balanced)
    """
    counts = np.asarray(counts, dtype=np.float64)
    if (counts <= 0).any():
        raise ValueError(f"every class needs training images for class weights, got counts {counts.tolist()}")
    n, k = counts.sum(), len(counts)
    if scheme == "one_minus_cf":
        return 1.0 - counts / n
    if scheme == "inverse_cf":
        return n / (k * counts)
    raise ValueError(f"unknown class weighting {scheme!r}")


class FocalLoss(nn.Module):
    """Lin et al. focal loss: mean of -(1 - p_t)^gamma * alpha_t * log p_t."""
    def __init__(self, gamma: float = 2.0, alpha=None):
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32))

    def forward(self, logits, target):
        logp = F.log_softmax(logits, 1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.alpha is not None:
            loss = loss * self.alpha[target]
        return loss.mean()


def make_loss(name: str, counts) -> nn.Module:
    if name == "ce":
        return nn.CrossEntropyLoss()
    if name == "wce_one_minus_cf":
        return nn.CrossEntropyLoss(weight=torch.tensor(class_weights(counts, "one_minus_cf"), dtype=torch.float32))
    if name == "wce_inverse_cf":
        return nn.CrossEntropyLoss(weight=torch.tensor(class_weights(counts, "inverse_cf"), dtype=torch.float32))
    if name == "focal":
        return FocalLoss(gamma=2.0)
    raise ValueError(f"unknown loss {name!r}; expected ce, wce_one_minus_cf, wce_inverse_cf, focal")
