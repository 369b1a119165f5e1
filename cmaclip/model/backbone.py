"""The CLIP text and vision encoders (HF transformers), giving token and patch states in one width.

Mapping both modalities into one width uses CLIP's own heads, applied to EVERY state instead of
only the pooled one: text_projection on all token states (already final-layer-normed by HF), and
vision post_layernorm + visual_projection on all patch states. At the EOT token and at the image
[CLS] this is exactly CLIP's text / image embedding, so a pretrained backbone starts in its joint
space and the `concat` baseline is exactly "fine-tuned CLIP". CLIPModel's logit_scale is not
carried: it is unused here and, as a 0-dim parameter, breaks DeepSpeed.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionModel


class CLIPBackbone(nn.Module):
    """CLIP towers + projections. A variant that needs one modality builds only that tower, so
    every parameter gets a gradient (DDP / DeepSpeed dislike unused parameters)."""

    def __init__(self, clip_config: CLIPConfig, use_text: bool = True, use_image: bool = True):
        super().__init__()
        self.clip_config = clip_config
        self.width = clip_config.projection_dim
        self.text_model = self.text_projection = None
        self.vision_model = self.visual_projection = None
        if use_text:
            hidden = clip_config.text_config.hidden_size
            self.text_model = CLIPTextModel(clip_config.text_config)
            self.text_projection = nn.Linear(hidden, self.width, bias=False)
            nn.init.normal_(self.text_projection.weight, std=hidden ** -0.5)  # as CLIPModel
        if use_image:
            hidden = clip_config.vision_config.hidden_size
            self.vision_model = CLIPVisionModel(clip_config.vision_config)
            self.visual_projection = nn.Linear(hidden, self.width, bias=False)
            nn.init.normal_(self.visual_projection.weight, std=hidden ** -0.5)

    @classmethod
    def from_pretrained(cls, name_or_path: str, use_text: bool = True, use_image: bool = True) -> "CLIPBackbone":
        """Real CLIP weights from the hub or a local folder (CLIPModel layout)."""
        clip = CLIPModel.from_pretrained(name_or_path)
        backbone = cls(clip.config, use_text=False, use_image=False)
        if use_text:
            backbone.text_model, backbone.text_projection = clip.text_model, clip.text_projection
        if use_image:
            backbone.vision_model, backbone.visual_projection = clip.vision_model, clip.visual_projection
        return backbone

    def enable_gradient_checkpointing(self) -> None:
        for tower in (self.text_model, self.vision_model):
            if tower is not None:
                tower.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, L] token ids -> [B, L, width]. No padding mask is passed: CLIP's text encoder is
        causal, so states up to the EOT never see the padding after it (and HF keeps its fused
        causal SDPA path)."""
        states = self.text_model(input_ids=input_ids).last_hidden_state
        return self.text_projection(states)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 1 + patches, width]; position 0 is the image [CLS]."""
        expected = self.clip_config.vision_config.image_size
        states = self.vision_model(
            pixel_values=pixel_values,
            interpolate_pos_encoding=pixel_values.shape[-1] != expected,
        ).last_hidden_state
        return self.visual_projection(self.vision_model.post_layernorm(states))


def eot_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] text mask -> [B] position of each row's EOT token, where CLIP pools the title: the
    mask is 1 up to and including the first EOT (0 for a row with no text at all)."""
    return (attention_mask.sum(dim=-1) - 1).clamp(min=0)


def at_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B, L, W] states, [B] positions -> [B, W]: each row's state at its own position (the EOT
    pooling of a title)."""
    return states[torch.arange(len(positions), device=positions.device), positions]
