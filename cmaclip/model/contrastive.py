"""CLIP's contrastive pretraining objective on image–title pairs: the model (the cmaclip backbone
plus a learnable temperature) and its two losses, CLIP's symmetric InfoNCE and SigLIP's sigmoid.

The global batch is the negatives. The caller passes `gather`, which concatenates a tensor's rows
over all ranks (rank order) with gradients flowing back to each rank's own rows (one process:
the identity). Each rank scores ITS rows against EVERY rank's rows (open_clip's `local_loss` with
`gather_with_grad`): the loss of rank r is the mean over its rows, so the mean over ranks (what
DDP's gradient averaging optimises) equals the one-process loss at the same global batch.

Rows without both an image and a title (and the loader's padding rows) take no part: they are
neither anchors nor negatives, so every rank keeps the same tensor shapes for the gather.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from .backbone import CLIPBackbone, at_positions, eot_positions
from .config import ContrastiveConfig, ModelConfig, preset_clip_config

# CLIP clamps the learnable logit scale at 100 (temperature 0.01) to keep training stable.
MAX_LOGIT_SCALE = math.log(100.0)

Gather = Callable[[torch.Tensor], torch.Tensor]


def no_gather(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class ContrastiveOutput(dict):
    """loss (0-dim), image_features and text_features ([B, width], L2-normed), logit_scale (exp,
    0-dim, detached). A dict, as CMAClipOutput, so that ZeRO-3 finds the output tensors."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ContrastiveCLIP(nn.Module):
    """Both CLIP towers with their projections (CLIPBackbone) and the logit scale (and, for
    SigLIP, a logit bias). The pooled features are CLIP's: the title's EOT state, the image's
    [CLS] state, both already projected by the backbone.

    The backbone comes from `config` as CMA-CLIP's does: `model.pretrained` (continue a CLIP
    checkpoint's training) or else `model.preset` at random init; the fusion keys are unused."""

    def __init__(self, config: ModelConfig, contrastive: ContrastiveConfig):
        super().__init__()
        if config.pretrained:
            self.backbone = CLIPBackbone.from_pretrained(config.pretrained)
        else:
            self.backbone = CLIPBackbone(preset_clip_config(config))
        clip = self.backbone.clip_config
        # the resolved sizes, read by the loader (as CMAClip.config)
        self.config = dataclasses.replace(
            config, image_size=config.image_size or clip.vision_config.image_size,
            context_length=min(config.context_length, clip.text_config.max_position_embeddings))
        if config.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
        self.contrastive = contrastive
        # 1-dim, not 0-dim: DeepSpeed cannot flatten a 0-dim parameter
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / contrastive.init_temperature)))
        self.logit_bias = nn.Parameter(torch.full((1,), contrastive.init_bias)) if contrastive.loss == "siglip" else None

    def encode(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> L2-normed image and title features [B, width]."""
        image = self.backbone.encode_image(pixel_values)[:, 0]
        eot = eot_positions(attention_mask)
        text_states = self.backbone.encode_text(input_ids)
        text = at_positions(text_states, eot)
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                modality_mask: torch.Tensor | None = None, gather: Gather = no_gather) -> ContrastiveOutput:
        """The batch contract (ARCHITECTURE.md): modality_mask [B, 2] bool (text, image; None = both
        present); the rows with both are the pairs."""
        image, text = self.encode(pixel_values, input_ids, attention_mask)
        if modality_mask is None:
            valid = torch.ones(len(image), dtype=torch.bool, device=image.device)
        else:
            valid = modality_mask.to(device=image.device, dtype=torch.bool).all(-1)
        scale = self.logit_scale.clamp(max=MAX_LOGIT_SCALE).exp().squeeze()
        if self.contrastive.loss == "clip":
            loss = clip_loss(image, text, valid, scale, gather)
        else:
            loss = siglip_loss(image, text, valid, scale, self.logit_bias.squeeze(), gather)
        return ContrastiveOutput(loss=loss, image_features=image, text_features=text, logit_scale=scale.detach())

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """A Hugging Face CLIPModel folder (config.json + model.safetensors): what
        `transformers.CLIPModel.from_pretrained` and `model.pretrained=<folder>` load.
        state_dict: this model's full state (DeepSpeed's consolidated one), default its own."""
        from safetensors.torch import save_file

        state = self.state_dict() if state_dict is None else state_dict
        prefix = "backbone."
        weights = {name[len(prefix):]: tensor for name, tensor in state.items() if name.startswith(prefix)}
        # HF's logit_scale is 0-dim; it holds the clamped value, as the model used it
        weights["logit_scale"] = state["logit_scale"].reshape(()).clamp(max=MAX_LOGIT_SCALE)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self.backbone.clip_config.to_dict()
        config.update(architectures=["CLIPModel"], logit_scale_init_value=float(weights["logit_scale"]))
        (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file({name: tensor.detach().float().contiguous().cpu() for name, tensor in weights.items()},
                  str(directory / "model.safetensors"), metadata={"format": "pt"})


def clip_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
              gather: Gather = no_gather) -> torch.Tensor:
    """CLIP's symmetric InfoNCE: each local image picks its title among all titles of the global
    batch, and each local title its image, cross entropy both ways, averaged. Invalid rows are
    masked out as anchors and as candidates."""
    all_image, all_text, all_valid = gather(image), gather(text), gather(valid.float()).bool()
    offset = own_offset(len(image), len(all_image))
    targets = torch.arange(len(image), device=image.device) + offset
    # far below any logit (|logit| <= 100) and finite: a row with nothing valid stays finite
    blocked = -1e4
    per_image = (scale * image @ all_text.T).masked_fill(~all_valid, blocked)
    per_text = (scale * text @ all_image.T).masked_fill(~all_valid, blocked)
    both = F.cross_entropy(per_image, targets, reduction="none") + F.cross_entropy(per_text, targets, reduction="none")
    return masked_mean(both / 2, valid)


def siglip_loss(image: torch.Tensor, text: torch.Tensor, valid: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor, gather: Gather = no_gather) -> torch.Tensor:
    """SigLIP: every (image, title) pair of the local images x global titles is an independent
    binary decision (match or not), log-sigmoid, summed over titles and averaged over images.
    No softmax over the batch, so the gather is only of titles (SigLIP's ring passes them round;
    one all-gather is the same sum)."""
    all_text, all_valid = gather(text), gather(valid.float())
    offset = own_offset(len(image), len(all_text))
    logits = scale * image @ all_text.T + bias
    labels = -torch.ones_like(logits)
    rows = torch.arange(len(image), device=image.device)
    labels[rows, rows + offset] = 1.0
    pair_loss = -F.logsigmoid(labels * logits) * all_valid
    return masked_mean(pair_loss.sum(-1), valid)


def own_offset(local: int, total: int) -> int:
    """Where this rank's rows start in the gathered batch (ranks hold equal-sized blocks, in
    rank order)."""
    return 0 if total == local else torch.distributed.get_rank() * local


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over the valid rows, 0 (with a zero gradient) when there are none."""
    return torch.where(valid, values, 0.0).sum() / valid.sum().clamp(min=1)
