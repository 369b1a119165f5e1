"""CMAClip: CLIP backbone -> sequence-wise attention -> per-task modality attention -> heads.

    text tokens  -> CLIP text encoder   -> text_projection ---------------+ + type[text]
    image        -> CLIP vision encoder -> post_layernorm + visual_proj. --+ + type[image]
    [T; I] (text padding and missing modalities masked) -> SequenceAttention -> T'[EOT], I'[CLS]
    per task k: keyless attention over (T'[EOT], I'[CLS]) -> fused_k -> head_k -> logits_k
    fused variants, training: the same model once more on the text alone and on the image alone
                (the other modality masked: the prediction a product with one modality gets),
                an auxiliary loss on both, so that each encoder has to learn its own modality;
                and once more on a noisy copy of each title (tokens dropped), without gradients
                into the encoders, so that the fusion learns to fall back on the photo

The fusion variants (`model.fusion`) change only what reaches the heads, for a fair ablation:
cma-no-modality replaces the modality attention by the mean over present modalities; concat,
image and text skip the sequence attention and use CLIP's own embeddings (EOT / [CLS] states).
Modules a variant does not use are not built, so every parameter gets a gradient.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPConfig

from cmaclip.model.attention import SequenceAttention
from cmaclip.model.backbone import CLIPBackbone, at_positions, eot_positions
from cmaclip.model.config import ModelConfig, preset_clip_config
from cmaclip.model.fusion import KeylessModalityAttention, TaskHead, mean_weights

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SAVE_FORMAT_VERSION = 3  # 2: separate unimodal heads; 3: none (the model alone is the unimodal prediction)
TEXT, IMAGE = 0, 1  # modality order everywhere: the sequence, modality_mask, modality_weights
MODALITY_NAMES = ("text", "image")


class CMAClipOutput(dict):
    """What CMAClip.forward returns, read as attributes (`output.loss`) or keys (`output["loss"]`).

    A dict, not a dataclass, because DeepSpeed ZeRO-3 finds the tensors of a module's output (to
    re-gather the partitioned parameters for backward) only inside dicts, lists and tuples.

    logits            task -> [B, classes of the task]
    modality_weights  [B, K, 2] (text, image) per sample and task; 0 for a missing modality.
                      Variants without modality attention report the weights they use: the
                      mean (cma-no-modality, concat) or the single modality (image, text).
    loss              weighted sum over tasks of the masked cross entropy; None without labels
    task_losses       task -> unweighted loss of the task (detached, for logging); 0 when no
                      sample has a label
    attentions        return_attentions only (cma, cma-no-modality): per sequence-attention
                      layer, [B, H, S, S] over [text positions 0..text_length-1; image [CLS];
                      patches]
    text_length       text positions in the sequence: the batch's longest attended text
                      (padding beyond it is trimmed before the encoders: it is masked anyway)
    unimodal_logits   "text" | "image" -> task -> [B, classes]: the model's prediction from that
                      modality alone, the other masked (fused variants with
                      model.unimodal_loss_weight > 0, in training or when asked with
                      `unimodal=True`; else {}). Meaningless for a sample without the modality.
    """

    def __init__(self, fields=(), /, **more):
        """The fields above as keywords, or as one mapping: Accelerate's mixed-precision wrapper
        (convert_outputs_to_fp32) rebuilds a dict output as `type(output)({...})`."""
        super().__init__(loss=None, task_losses={}, attentions=None, text_length=0, unimodal_logits={})
        self.update(fields, **more)

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        self[name] = value


class CMAClip(nn.Module):
    def __init__(self, config: ModelConfig, tasks: dict[str, list[str]], clip_config: dict | None = None):
        """tasks: task name -> class names, in dataset.json order (the order of the label columns).
        clip_config: a CLIPConfig dict, as saved by save_pretrained: builds that shape with random
        weights and skips `config.pretrained` (loading a saved model never touches the hub)."""
        super().__init__()
        if not tasks:
            raise ValueError("CMAClip needs at least one task")
        for task, classes in tasks.items():
            if len(classes) < 1:
                raise ValueError(f"task {task!r} has no classes")
        unknown = sorted(set(config.task_weights) - set(tasks))
        if unknown:
            raise ValueError(f"model.task_weights: unknown task(s) {unknown}; tasks are {list(tasks)}")
        self.tasks = {task: list(classes) for task, classes in tasks.items()}
        self.task_names = list(tasks)

        fusion = config.fusion
        self.uses_text = fusion != "image"
        self.uses_image = fusion != "text"
        if clip_config is not None:
            self.backbone = CLIPBackbone(CLIPConfig.from_dict(clip_config), self.uses_text, self.uses_image)
        elif config.pretrained:
            self.backbone = CLIPBackbone.from_pretrained(config.pretrained, self.uses_text, self.uses_image)
        else:
            self.backbone = CLIPBackbone(preset_clip_config(config), self.uses_text, self.uses_image)
        clip = self.backbone.clip_config
        # the resolved sizes, so that the loader (and a saved config) read real values, never 0
        self.config = dataclasses.replace(
            config,
            image_size=config.image_size or clip.vision_config.image_size,
            context_length=min(config.context_length, clip.text_config.max_position_embeddings),
        )
        width = self.backbone.width

        self.modality_embedding = self.sequence_attention = self.modality_attention = None
        if fusion in ("cma", "cma-no-modality"):
            self.modality_embedding = nn.Parameter(torch.randn(2, width) * 0.02)
            self.sequence_attention = SequenceAttention(width, config.fusion_heads, config.fusion_layers,
                                                        config.mlp_ratio, config.dropout)
        if fusion == "cma":
            self.modality_attention = KeylessModalityAttention(len(tasks), width)
        head_in = 2 * width if fusion == "concat" else width
        self.heads = self._task_heads(head_in)
        fused = self.uses_text and self.uses_image
        self.learns_each_alone = fused and config.unimodal_loss_weight > 0
        self.learns_from_noisy_titles = fused and config.noisy_title_loss_weight > 0
        if config.gradient_checkpointing:
            self.backbone.enable_gradient_checkpointing()
            if self.sequence_attention is not None:
                self.sequence_attention.gradient_checkpointing = True

    def _task_heads(self, in_width: int) -> nn.ModuleList:
        return nn.ModuleList(TaskHead(in_width, self.config.head_hidden or self.backbone.width, len(classes),
                                      self.config.dropout) for classes in self.tasks.values())

    def forward(self, pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None,
                attention_mask: torch.Tensor | None, modality_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_attentions: bool = False,
                text_length: int | None = None, nothing_masked: bool | None = None,
                unimodal: bool = False) -> CMAClipOutput:
        """The batch contract of ARCHITECTURE.md: pixel_values [B, 3, S, S], input_ids and
        attention_mask [B, L], modality_mask [B, 2] bool (text, image; None = both present),
        labels [B, K] (-1 = missing). The `image` / `text` variants accept None for the modality
        they do not read. text_length / nothing_masked: the loader's host-side counts of the batch
        (model_inputs(..., with_host_facts=True)); without them the model waits for the device.
        unimodal: also return `unimodal_logits` outside training (evaluation reports them)."""
        given = pixel_values if input_ids is None else input_ids
        batch, device = given.shape[0], given.device
        present = (torch.ones(batch, 2, dtype=torch.bool, device=device) if modality_mask is None
                   else modality_mask.to(device=device, dtype=torch.bool))
        if self.training and self.config.modality_dropout > 0 and self.uses_text and self.uses_image:
            present = drop_one_modality(present, self.config.modality_dropout)
            nothing_masked = False  # the dropout may have masked a modality: keep the mask (no device read)

        text_length = text_length if self.uses_text else 0
        text_states = image_states = eot = None
        if self.uses_text:
            input_ids, attention_mask, text_length = self._trim_text(input_ids, attention_mask, text_length)
            text_states = self.backbone.encode_text(input_ids)  # [B, L', W]
            eot = eot_positions(attention_mask)  # T[EOT]
        if self.uses_image:
            image_states = self.backbone.encode_image(pixel_values)  # [B, 1 + P, W]

        text_eot, image_cls, attentions = self._summaries(text_states, image_states, attention_mask, eot, present,
                                                          return_attentions, nothing_masked)
        logits, weights = self._predict(text_eot, image_cls, present)
        unimodal_logits = {}
        if self.learns_each_alone and (self.training or unimodal):
            for m, name in enumerate(MODALITY_NAMES):
                alone = present & (torch.arange(2, device=device) == m)
                given = (text_states, None) if m == TEXT else (None, image_states)
                # the sequence attention over one modality's positions: exactly what the full
                # sequence gives those positions with the other modality's keys masked, and cheaper
                text_eot, image_cls, _ = self._summaries(*given, attention_mask, eot, alone, nothing_masked=False)
                unimodal_logits[name], _ = self._predict(text_eot, image_cls, alone)
        noisy_title_logits = None
        if self.learns_from_noisy_titles and self.training:
            noisy_title_logits = self._predict_from_noisy_titles(input_ids, attention_mask, image_states, present)
        output = CMAClipOutput(logits=logits, modality_weights=weights.float(), attentions=attentions,
                               text_length=text_length, unimodal_logits=unimodal_logits)
        if labels is not None:
            output.loss, output.task_losses = self.loss(logits, labels)
            for m, name in enumerate(unimodal_logits):
                # each modality alone learns from the samples that have it (after modality dropout)
                output.loss = output.loss + self.config.unimodal_loss_weight * self._loss_where(
                    present[:, m], unimodal_logits[name], labels)
            if noisy_title_logits is not None:
                output.loss = output.loss + self.config.noisy_title_loss_weight * self._loss_where(
                    present[:, TEXT], noisy_title_logits, labels)
        return output

    def _loss_where(self, rows: torch.Tensor, logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """The loss over the rows [B] bool only (the others count as unlabelled)."""
        return self.loss(logits, torch.where(rows[:, None].to(labels.device), labels, -1))[0]

    def _predict_from_noisy_titles(self, input_ids, attention_mask, image_states, present):
        """The fused prediction once more, each title replaced by a noisy copy (drop_title_tokens),
        the photo as it is. The encoders run without gradients (they learn from clean titles alone);
        the fusion learns from it: the sequence attention to draw on the patches, and the modality
        attention and the heads to weigh the photo, where a title has lost its telling words."""
        noisy_ids, noisy_mask = drop_title_tokens(input_ids, attention_mask, self.config.noisy_title_drop_max)
        with torch.no_grad():
            text_states = self.backbone.encode_text(noisy_ids)
        text_eot, image_cls, _ = self._summaries(text_states, image_states.detach(), noisy_mask,
                                                 eot_positions(noisy_mask), present, nothing_masked=False)
        return self._predict(text_eot, image_cls, present)[0]

    def _summaries(self, text_states, image_states, attention_mask, eot, present, return_attentions=False,
                   nothing_masked=None):
        """The per-modality summaries that reach the fusion -> (T'[EOT] [B, W], I'[CLS] [B, W],
        attentions): after the sequence attention over the given modalities' positions (text
        padding and missing modalities masked), or CLIP's own EOT / [CLS] states in the variants
        without it. A modality not given (None) gets None."""
        if self.sequence_attention is None:
            return (None if text_states is None else at_positions(text_states, eot),
                    None if image_states is None else image_states[:, 0], None)
        parts, key_masks = [], []
        if text_states is not None:
            parts.append(text_states + self.modality_embedding[TEXT])
            key_masks.append(attention_mask.bool() & present[:, TEXT, None])
        if image_states is not None:
            parts.append(image_states + self.modality_embedding[IMAGE])
            key_masks.append(present[:, IMAGE, None].expand(-1, image_states.shape[1]))
        sequence, attentions = self.sequence_attention(torch.cat(parts, dim=1), torch.cat(key_masks, dim=1),
                                                       return_attentions, nothing_masked)
        text_length = 0 if text_states is None else text_states.shape[1]
        return (None if text_states is None else at_positions(sequence, eot),
                None if image_states is None else sequence[:, text_length], attentions)

    def _predict(self, text_eot, image_cls, present):
        """Summaries (one may be None: its modality counts as missing) -> (task -> logits, weights)."""
        text_eot = torch.zeros_like(image_cls) if text_eot is None else text_eot
        image_cls = torch.zeros_like(text_eot) if image_cls is None else image_cls
        task_inputs, weights = self._fuse(text_eot, image_cls, present)
        logits = {task: head(task_inputs[:, k]) for k, (task, head) in enumerate(zip(self.task_names, self.heads))}
        return logits, weights

    def _fuse(self, text_eot, image_cls, present):
        """The two modality embeddings [B, W] -> (per-task head inputs [B, K, W'], weights [B, K, 2])."""
        num_tasks = len(self.task_names)
        if self.config.fusion in ("cma", "cma-no-modality"):
            modalities = torch.stack([text_eot, image_cls], dim=1)  # [B, 2, W]
            if self.modality_attention is not None:
                return self.modality_attention(modalities, present)
            weights = mean_weights(present, num_tasks)
            return weights.to(modalities.dtype) @ modalities, weights
        if self.config.fusion == "concat":
            # a missing modality's embedding is zeroed, so its placeholder input cannot leak in
            pair = torch.cat([text_eot * present[:, TEXT, None], image_cls * present[:, IMAGE, None]], dim=-1)
            return pair[:, None, :].expand(-1, num_tasks, -1), mean_weights(present, num_tasks)
        only = TEXT if self.config.fusion == "text" else IMAGE
        present = present & (torch.arange(2, device=present.device) == only)
        embedding = (text_eot if only == TEXT else image_cls) * present[:, only, None]
        return embedding[:, None, :].expand(-1, num_tasks, -1), mean_weights(present, num_tasks)

    def _trim_text(self, input_ids, attention_mask, length=None):
        """Drop the padding columns beyond the batch's longest text: exact (the text encoder is
        causal and the sequence attention masks padding) and it shortens every sequence."""
        if input_ids.shape[1] > self.config.context_length:
            raise ValueError(f"input_ids has {input_ids.shape[1]} positions, the model takes at most "
                             f"model.context_length={self.config.context_length}")
        if length is None:
            length = max(int(attention_mask.sum(dim=1).max()), 1)
        return input_ids[:, :length], attention_mask[:, :length], length

    def loss(self, logits: dict[str, torch.Tensor], labels: torch.Tensor):
        """Sum over tasks of weight_k * mean cross entropy over the samples labelled for task k.
        -> (total, {task: detached task loss}). A task without labels in the batch gives 0."""
        if labels.ndim != 2 or labels.shape[1] != len(self.task_names):
            raise ValueError(f"labels must be [batch, {len(self.task_names)}] (tasks {self.task_names}), "
                             f"got shape {list(labels.shape)}")
        total, task_losses = 0.0, {}
        for k, task in enumerate(self.task_names):
            target = labels[:, k].to(logits[task].device)
            summed = F.cross_entropy(logits[task].float(), target, ignore_index=-1, reduction="sum",
                                     label_smoothing=self.config.label_smoothing)
            task_loss = summed / (target >= 0).sum().clamp(min=1)
            task_losses[task] = task_loss.detach()
            total = total + self.config.task_weights.get(task, 1.0) * task_loss
        return total, task_losses

    def save_pretrained(self, directory: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json + model.safetensors. state_dict: pass the consolidated weights when
        the live ones are sharded (DeepSpeed ZeRO-3), else this model's own are saved."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.state_dict()
        else:
            expected = set(self.state_dict())
            missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
            if missing or unexpected:
                raise ValueError(f"save_pretrained: the state_dict does not fit this model: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}")
        config = {
            "format_version": SAVE_FORMAT_VERSION,
            "model": dataclasses.asdict(self.config),
            "tasks": self.tasks,
            "clip": self.backbone.clip_config.to_dict(),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in state_dict.items()},
                  str(directory / WEIGHTS_FILE), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "CMAClip":
        """Load what save_pretrained wrote; needs neither the hub nor DeepSpeed."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: is {directory} a folder written by "
                                        "CMAClip.save_pretrained (an output_dir's model/)?")
        saved = json.loads(config_path.read_text())
        version = saved.get("format_version")
        if version not in (1, 2, SAVE_FORMAT_VERSION):
            raise ValueError(f"{config_path}: format_version {version!r}, this cmaclip reads 1 to {SAVE_FORMAT_VERSION}")
        weights = load_file(str(weights_path))
        if version == 1:  # before the auxiliary loss: the same model, built without it
            saved["model"].setdefault("unimodal_loss_weight", 0.0)
        if version == 2:
            # version 2 had separate unimodal heads; they are dropped, and a product with one
            # modality gets the fused heads' answer with the other masked, as in version 3
            saved["model"].pop("unimodal_when_missing", None)
            weights = {name: tensor for name, tensor in weights.items() if not name.startswith("unimodal_heads.")}
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(saved["model"]) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown model config key(s) {unknown}")
        model = cls(ModelConfig(**saved["model"]), saved["tasks"], clip_config=saved["clip"])
        model.load_state_dict(weights)
        return model.to(map_location)


def drop_one_modality(present: torch.Tensor, probability: float) -> torch.Tensor:
    """Modality dropout: each sample with both modalities loses one (chosen uniformly) with the
    given probability; a sample that already lacks one keeps what it has."""
    drop = (torch.rand(present.shape[0], device=present.device) < probability) & present.all(dim=-1)
    which = torch.randint(0, 2, (present.shape[0],), device=present.device)
    dropped = F.one_hot(which, 2).bool() & drop[:, None]
    return present & ~dropped


def drop_title_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      max_rate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy copy of each title: per row a rate drawn uniformly from [0, max_rate), and each
    token between SOT and EOT dropped with it; the kept ones close up in order, EOT after them,
    padding (id 0, mask 0) behind. -> (input_ids, attention_mask), the shapes of the inputs."""
    batch, length = input_ids.shape
    positions = torch.arange(length, device=input_ids.device)
    title = (positions > 0) & (positions < eot_positions(attention_mask)[:, None])
    rate = torch.rand(batch, 1, device=input_ids.device) * max_rate
    kept = attention_mask.bool() & ~(title & (torch.rand(batch, length, device=input_ids.device) < rate))
    order = torch.sort((~kept).to(torch.uint8), dim=1, stable=True).indices  # kept first, in order
    mask = (positions < kept.sum(dim=1, keepdim=True)).to(attention_mask.dtype)
    return torch.gather(input_ids, 1, order) * mask, mask
