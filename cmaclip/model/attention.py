"""Sequence-wise attention: a pre-norm Transformer encoder over [text tokens; image patches].

The attention core is `F.scaled_dot_product_attention` (SDPA): on CPU its fused flash-style kernel,
on CUDA the Flash / memory-efficient / cuDNN kernels, chosen by torch. `reference_attention` is the
explicit softmax(QK^T / sqrt(d)) V: the tests compare against it, and `return_attentions=True`
(the explain command) uses it because fused kernels never materialise the weights.

How padding reaches SDPA. `key_mask` [B, S] (True = a real token) becomes a boolean attn_mask of
shape [B, 1, 1, S], broadcast over heads and queries, never expanded to [B, H, S, S]. On CUDA any
attn_mask rules out the Flash kernel, so SequenceAttention passes attn_mask=None whenever nothing
is masked: the model trims text to the longest text in the batch first, so a batch of equal-length
texts with both modalities present runs on Flash. With real padding, torch picks the
memory-efficient (or cuDNN) kernel, which takes the mask in bf16/fp16/fp32, is also fused (no
[S, S] matrix in memory), and for these short sequences (S <= 77 + 197 for B/16) the attention core
is a minority of a layer's time next to its projections and MLP (bench/attention.py prints both),
so not having Flash costs little. Packing the valid tokens for `torch.nn.attention.varlen` would
give Flash with padding too; it is CUDA-only, untestable on our CPU machines, and not done here.

Fully-masked rows: a query row whose keys are all masked gives NaN in softmax. Only a sample with
no key at all could produce one (padding queries still see the sample's real keys), so such a
sample attends to all its positions instead: its outputs are finite and meaningless, and the model
gives it zero modality weights anyway.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_mask: torch.Tensor | None) -> torch.Tensor:
    """q, k, v [B, H, S, D]; key_mask [B, S] bool (True = attend) or None -> [B, H, S, D]."""
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The explicit computation: -> (output [B, H, S, D], weights [B, H, S, S])."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    weights = scores.softmax(dim=-1)
    return weights @ v, weights


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"model.fusion_heads: {heads} does not divide the fusion width {width}")
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, reference: bool = False):
        """x [B, S, W] -> (y [B, S, W], weights [B, H, S, S] if reference else None)."""
        batch, length, width = x.shape
        q, k, v = (self.qkv(x).view(batch, length, 3, self.heads, width // self.heads)
                   .permute(2, 0, 3, 1, 4))
        if reference:
            y, weights = reference_attention(q, k, v, key_mask)
        else:
            y, weights = fused_attention(q, k, v, key_mask), None
        return self.out(y.transpose(1, 2).reshape(batch, length, width)), weights


class FusionLayer(nn.Module):
    """Pre-norm Transformer layer: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width)
        self.attention = SelfAttention(width, heads)
        self.mlp_norm = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(),
                                 nn.Linear(mlp_ratio * width, width))
        self.dropout = nn.Dropout(dropout)
        # Both residual branches start at zero, so the untrained layer is the identity: T'[EOT]
        # and I'[CLS] begin as the CLIP embeddings (a pretrained backbone keeps what it knows)
        # and cross-modality attention is added only as far as training finds it useful.
        for branch_output in (self.attention.out, self.mlp[-1]):
            nn.init.zeros_(branch_output.weight)
            nn.init.zeros_(branch_output.bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, reference: bool = False):
        attended, weights = self.attention(self.attention_norm(x), key_mask, reference)
        x = x + self.dropout(attended)
        x = x + self.dropout(self.mlp(self.mlp_norm(x)))
        return x, weights


class SequenceAttention(nn.Module):
    """N FusionLayers and a final LayerNorm over the whole [T; I] sequence."""

    def __init__(self, width: int, heads: int, layers: int, mlp_ratio: int = 4, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(width, heads, mlp_ratio, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None,
                return_attentions: bool = False, nothing_masked: bool | None = None,
                ) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """x [B, S, W], key_mask [B, S] bool -> (x' [B, S, W], per-layer weights or None).

        return_attentions runs the reference attention (same result, slower, weights kept).
        nothing_masked: whether key_mask is all True, if the caller knows (None: read it from the
        device, a sync)."""
        if nothing_masked:
            key_mask = None  # lets CUDA use Flash
        if key_mask is not None:
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)  # no sample without keys
            if nothing_masked is None and bool(key_mask.all()):
                key_mask = None
        attentions = [] if return_attentions else None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and not return_attentions:
                x, _ = checkpoint(layer, x, key_mask, use_reentrant=False)
            else:
                x, weights = layer(x, key_mask, reference=return_attentions)
                if return_attentions:
                    attentions.append(weights)
        return self.norm(x), attentions
