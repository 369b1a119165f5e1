"""Modality-wise attention and the per-task heads.

Keyless attention (the paper's modality-wise attention): each task k owns a learned vector w_k;
the score of modality m is w_k . h_m (h_m = T'[EOT] or I'[CLS], layer-normed by the sequence
attention), the weights are the softmax over the modalities PRESENT, and the fused vector is the
weighted sum. The scoring is linear, as in the paper: with w_k = 0 at init every task starts from
the plain mean and learns its own preference. Weights are [B, K, 2] in (text, image) order.
"""
from __future__ import annotations

import torch
from torch import nn


class KeylessModalityAttention(nn.Module):
    def __init__(self, num_tasks: int, width: int):
        super().__init__()
        self.task_vectors = nn.Parameter(torch.zeros(num_tasks, width))

    def forward(self, modalities: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """modalities [B, 2, W], present [B, 2] bool -> (fused [B, K, W], weights [B, K, 2]).

        A missing modality gets weight exactly 0; a sample with none gets all-zero weights."""
        scores = torch.einsum("kw,bmw->bkm", self.task_vectors, modalities)
        scores = scores.masked_fill(~present[:, None, :], torch.finfo(scores.dtype).min)
        # the masked score underflows to exactly 0 after softmax; the product zeroes the
        # (uniform) weights of a sample with no modality present
        weights = scores.softmax(dim=-1) * present[:, None, :]
        return weights @ modalities, weights


def mean_weights(present: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """The weights of a plain mean over the present modalities: present [B, 2] -> [B, K, 2]."""
    weights = present.float() / present.sum(dim=-1, keepdim=True).clamp(min=1)
    return weights[:, None, :].expand(-1, num_tasks, -1)


class TaskHead(nn.Module):
    """LayerNorm -> Linear -> GELU -> Dropout -> Linear: one per task, the same for every fusion
    variant (the norm puts CLIP embeddings and sequence-attention outputs on one scale)."""

    def __init__(self, in_width: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(in_width), nn.Linear(in_width, hidden), nn.GELU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
