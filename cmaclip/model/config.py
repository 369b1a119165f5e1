"""ModelConfig (the `model.*` keys) and the backbone presets.

A preset is a published CLIP shape written out as CLIPConfig values, so a randomly initialised
model of any size can be built without the hub. `model.pretrained` replaces the preset's weights
AND shape with a real checkpoint (HF name or local folder).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from transformers import CLIPConfig

# `model.fusion` values, simplest first (the order of the paper's Table 6, which `cmaclip ablate` writes):
# one modality, both concatenated (fine-tuned CLIP), CMA-CLIP without and with modality attention.
FUSIONS = ("image", "text", "concat", "cma-no-modality", "cma")

# The shapes of the released OpenAI checkpoints (openai/clip-vit-base-patch32, -base-patch16,
# -large-patch14). `tiny` is ours: small enough for the tests' many forwards and backwards on one
# CPU core (docs/MEASUREMENTS.md), with 64 patches per image so attention maps still show something.
# The vocabulary is CLIP's (49408) at every size: the shards hold CLIP BPE ids.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        projection_dim=128,
        text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4),
        vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                    image_size=64, patch_size=8),
    ),
    "vit-b-32": dict(
        projection_dim=512,
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32),
    ),
    "vit-b-16": dict(
        projection_dim=512,
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=16),
    ),
    "vit-l-14": dict(
        projection_dim=768,
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=224, patch_size=14),
    ),
}


@dataclass
class ModelConfig:
    """The `model.*` keys. Plain types only: values come from YAML and `key=value` overrides."""

    preset: str = "tiny"
    """Backbone shape for random init: tiny | vit-b-32 | vit-b-16 | vit-l-14. Ignored for the
    backbone when `pretrained` is set (the checkpoint brings its own shape)."""

    pretrained: str = ""
    """HF model name (e.g. openai/clip-vit-base-patch16) or local folder to load CLIP weights from
    with `CLIPModel.from_pretrained`; empty = random init from `preset`. Only read when a model is
    first built: a saved cmaclip model carries its CLIP config and never goes back to the hub."""

    fusion: str = "cma"
    """cma (sequence + modality attention) | cma-no-modality (sequence attention, then the mean of
    the present modalities) | concat (the two CLIP embeddings concatenated: fine-tuned CLIP) |
    image | text (one modality's CLIP embedding). All use the same per-task heads."""

    fusion_layers: int = 2
    """Transformer layers of the sequence-wise attention over [text tokens; image patches]."""

    fusion_heads: int = 8
    """Attention heads of the sequence-wise attention; must divide the fusion width (the CLIP
    projection dim: 128 tiny, 512 B, 768 L)."""

    mlp_ratio: int = 4
    """Hidden width of the sequence-attention MLP, as a multiple of the fusion width."""

    dropout: float = 0.1
    """Dropout on the sequence-attention residual branches and inside the task heads."""

    head_hidden: int = 0
    """Hidden width of each task's MLP head; 0 = the fusion width."""

    modality_dropout: float = 0.0
    """Training only: probability that a sample with both modalities loses one of them (text or
    image, equally likely; never both), so the model learns to predict from either alone."""

    unimodal_loss_weight: float = 1.0
    """Fused variants (cma, cma-no-modality, concat): in training the model also predicts from the
    text alone and from the image alone (the same layers and heads, the other modality masked:
    exactly the prediction a product with one modality gets), and their cross entropies (each over
    the samples that have the modality), times this weight, join the loss. It makes each encoder
    learn its own modality, and the model answer well when a title or a photo is missing: without
    it the fused model learns whichever modality is easiest to fit and leaves the other untrained
    (docs/RESULTS.md). Costs two more passes of the fusion layers and heads per training step (the
    encoders run once). 0 = off."""

    noisy_title_loss_weight: float = 1.0
    """Fused variants, training only: the model also predicts once more from a noisy copy of each
    title (see noisy_title_drop_max) with the photo unchanged, and that cross entropy (over the
    samples with a title), times this weight, joins the loss. The encoders run without gradients
    in that pass (they learn from clean titles only); the fusion (sequence and modality attention,
    heads) learns from it to draw on the photo when a title has lost its telling words. With 30%
    of the title words dropped, `cma` on the real sample loses 6.3 points instead of 9.5, at the
    same clean accuracy (docs/RESULTS.md). Costs one more text-encoder forward and fusion pass per
    step (+12% FLOPs on ViT-B/32). 0 = off."""

    noisy_title_drop_max: float = 0.5
    """The noisy titles' damage: per product a rate drawn uniformly from [0, this), and each title
    token (between SOT and EOT) dropped with that rate."""

    label_smoothing: float = 0.0
    """Label smoothing of every task's cross entropy."""

    task_weights: dict[str, float] = field(default_factory=dict)
    """Loss weight per task name; tasks not named weigh 1."""

    image_size: int = 0
    """Input resolution; 0 = the preset's (or the pretrained checkpoint's). A different size
    re-shapes the position table of a random-init model and interpolates a pretrained one."""

    context_length: int = 77
    """Text positions (CLIP: 77). Must match the shards' context_length."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (CLIP encoders and sequence attention): less
    memory for large models and batches, about a third more compute."""

    def __post_init__(self) -> None:
        """Raise ValueError naming the `model.*` key that is wrong (at config load, not later)."""
        if self.fusion not in FUSIONS:
            raise ValueError(f"model.fusion: {self.fusion!r} is not one of {', '.join(FUSIONS)}")
        if not self.pretrained and self.preset not in PRESETS:
            raise ValueError(f"model.preset: {self.preset!r} is not one of {', '.join(PRESETS)}")
        for name in ("fusion_layers", "fusion_heads", "mlp_ratio", "context_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("head_hidden", "image_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}: must be >= 0 (0 = default), got {getattr(self, name)}")
        for name in ("unimodal_loss_weight", "noisy_title_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("dropout", "modality_dropout", "noisy_title_drop_max", "label_smoothing"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name}: must be in [0, 1), got {getattr(self, name)}")
        for task, weight in self.task_weights.items():
            if not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"model.task_weights.{task}: must be a number >= 0, got {weight!r}")


def preset_clip_config(config: ModelConfig) -> CLIPConfig:
    """The CLIPConfig of `config.preset`, with `image_size` and `context_length` applied."""
    preset = PRESETS[config.preset]
    text = dict(preset["text"], max_position_embeddings=config.context_length)
    vision = dict(preset["vision"])
    if config.image_size:
        if config.image_size % vision["patch_size"]:
            raise ValueError(f"model.image_size: {config.image_size} is not a multiple of preset "
                             f"{config.preset!r}'s patch size {vision['patch_size']}")
        vision["image_size"] = config.image_size
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=preset["projection_dim"])


LOSSES = ("clip", "siglip")


@dataclass
class ContrastiveConfig:
    """The `pretrain.*` keys: the contrastive objective of `cmaclip pretrain`."""

    loss: str = "clip"
    """clip (symmetric InfoNCE over the global batch, softmax over all titles / images) | siglip
    (pairwise sigmoid, no softmax: scales better to large batches)."""

    init_temperature: float = 0.07
    """Initial temperature (CLIP: 0.07, i.e. logit scale 1/0.07); it is learned, and clamped at
    0.01 (logit scale 100) as in CLIP."""

    init_bias: float = -10.0
    """SigLIP only: initial logit bias (SigLIP's -10: most pairs are negatives)."""

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"pretrain.loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if not 0.01 <= self.init_temperature <= 1.0:
            raise ValueError(f"pretrain.init_temperature: must be in [0.01, 1], got {self.init_temperature}")
