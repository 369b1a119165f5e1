"""The typed run config: `model.*`, `data.*`, `optim.*`, `train.*`, `logging.*`, `pretrain.*` and `output_dir`.

A run is described by defaults <- a YAML recipe (configs/*.yaml) <- `key.sub=value` overrides from
the command line. Every key is a dataclass field with a docstring (`cmaclip train --keys` lists
them); a value is converted to the field's type, and a key that names no field is an error that
names the key and the file it came from, so a typo never silently trains with a default.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cmaclip.data.config import DataConfig
from cmaclip.errors import CmaclipError
from cmaclip.model.config import ContrastiveConfig, ModelConfig

PACKAGED_CONFIGS = Path(__file__).parent / "configs"
MIXED_PRECISIONS = ("auto", "bf16", "no")  # train.mixed_precision (and predict/explain --mixed-precision)


class ConfigError(CmaclipError, ValueError):
    """A config key or value that cannot be used; the message names the key and its source."""

    exit_code = 2  # like a usage error


@dataclass
class OptimConfig:
    """The `optim.*` keys: AdamW with two learning rates, warmup + cosine, clipping."""

    lr: float = 5e-4
    """Peak learning rate of the new layers (sequence attention, modality attention, task heads)."""

    backbone_lr: float = 2e-5
    """Peak learning rate of the CLIP backbone (`model.backbone`). Pretrained CLIP forgets what it
    knows at the new layers' rate, so this is usually 10-50x lower."""

    freeze_backbone_steps: int = 0
    """The backbone's learning rate is 0 for this many optimizer steps (the new layers settle on
    a fixed backbone first), then it warms up like the rest. Done through the learning rate, not
    requires_grad, so DDP and ZeRO see the same parameters throughout."""

    weight_decay: float = 0.05
    """AdamW decoupled weight decay. Never applied to norms, biases and embeddings."""

    beta1: float = 0.9
    """AdamW first-moment decay."""

    beta2: float = 0.98
    """AdamW second-moment decay (CLIP's 0.98: steadier with large batches than 0.999)."""

    eps: float = 1e-6
    """AdamW epsilon."""

    warmup_steps: int = 100
    """Linear warmup from 0 to the peak learning rate over this many optimizer steps."""

    min_lr_ratio: float = 0.0
    """The cosine decay ends at this fraction of the peak learning rate at `train.max_steps`."""

    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 = no clipping."""

    def validate(self) -> None:
        for name in ("lr", "backbone_lr", "weight_decay", "eps", "grad_clip"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("beta1", "beta2", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"optim.{name}: must be in [0, 1], got {getattr(self, name)}")
        for name in ("warmup_steps", "freeze_backbone_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}: must be >= 0, got {getattr(self, name)}")


@dataclass
class TrainConfig:
    """The `train.*` keys: how long, how big, when to save and evaluate."""

    max_steps: int = 1000
    """Optimizer steps to train for (each sees batch_size x grad_accum_steps x processes samples)."""

    batch_size: int = 32
    """Samples per process per micro-batch (DeepSpeed's train_micro_batch_size_per_gpu)."""

    grad_accum_steps: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""

    seed: int = 0
    """Seeds model init, data order and augmentation, dropout. Same seed, same run."""

    mixed_precision: str = "auto"
    """auto (bf16 autocast on GPUs that compute bf16 natively, Ampere and newer; fp32 on CPU and
    older GPUs) | bf16 | no. Under DeepSpeed this fills the `bf16.enabled: auto` of the ds_config."""

    cudnn_attention: bool = True
    """On CUDA, let attention use cuDNN's fused kernel (torch prefers it on Hopper with a recent
    cuDNN). false turns it off (Flash / memory-efficient kernels instead): for NaN gradients with
    padding masks, as reported in pytorch#196678 (README, troubleshooting)."""

    save_every: int = 500
    """Save a resumable checkpoint every this many optimizer steps (and always at the end);
    0 = only at the end."""

    keep_last: int = 2
    """Checkpoints kept under output_dir/checkpoints; older ones are deleted after each save."""

    resume: str = "auto"
    """auto (continue from the newest checkpoint in output_dir/checkpoints, or start fresh if there
    is none) | a checkpoint folder | empty (start fresh; refuses an output_dir that has checkpoints)."""

    eval_every: int = 0
    """Evaluate on `data.eval_split` every this many optimizer steps (and at the end); 0 = only at
    the end. Skipped when the shards have no such split."""

    max_nonfinite_steps: int = 5
    """A step whose loss or gradient norm is NaN/inf on any rank is skipped (counted in the
    train/nonfinite_steps scalar); this many in a row stop the run with one message (the run
    diverged; its checkpoints hold only finite weights)."""

    export: bool = True
    """At the end, write output_dir/model/: consolidated fp32 weights + config, loadable without
    DeepSpeed (CMAClip.from_pretrained)."""

    compile: bool = False
    """torch.compile the model (inductor, through Accelerate: after the DDP wrap, or the DeepSpeed
    engine's module in place). The first steps pay minutes of compilation (and recompile for new
    title lengths until the shape goes dynamic). On CPU no faster (bench/compile.py; README,
    "Efficiency"), hence off by default; measure a GPU with bench/gpu_check.sh --compile."""

    def validate(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum_steps", "keep_last", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("save_every", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name}: must be >= 0 (0 = only at the end), got {getattr(self, name)}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise ConfigError(f"train.mixed_precision: {self.mixed_precision!r} is not one of "
                              f"{', '.join(MIXED_PRECISIONS)}")


@dataclass
class LoggingConfig:
    """The `logging.*` keys: what rank 0 reports while training."""

    log_every: int = 10
    """Write the train/* TensorBoard scalars every this many optimizer steps. The ranks also agree
    on a stop request (SIGUSR1, Slurm's warning 120 s before the time limit; SIGTERM) at these
    steps only, to save the all-reduce and host sync of every other step: keep log_every x the
    step time well under 120 s, and under Slurm's KillWait (30 s by default) for SIGTERM."""

    tensorboard: bool = True
    """Write TensorBoard event files under output_dir/tensorboard (rank 0 only)."""

    progress_bar: bool = True
    """Show progress on rank 0: a tqdm bar (steps, loss, samples/s, ETA) in a terminal; written to
    a file (Slurm's output, `> run.out`), one line every log_every steps instead."""

    def validate(self) -> None:
        if self.log_every < 1:
            raise ConfigError(f"logging.log_every: must be >= 1, got {self.log_every}")


@dataclass
class RunConfig:
    """One training run. YAML recipes and `key.sub=value` overrides fill it."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The model: backbone preset or pretrained CLIP, fusion variant, heads (cmaclip/model/config.py)."""

    data: DataConfig = field(default_factory=DataConfig)
    """The data: shards folder, decoding backend, augmentation, workers (cmaclip/data/config.py)."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""

    train: TrainConfig = field(default_factory=TrainConfig)
    """Steps, batch size, checkpoints, evaluation."""

    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """TensorBoard, progress bar."""

    pretrain: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    """The contrastive loss of `cmaclip pretrain` (unused by `cmaclip train`)."""

    output_dir: str = "runs/cmaclip"
    """Everything the run writes: tensorboard/, checkpoints/, model/. On several nodes it must be
    on a filesystem all nodes share (checkpoints are written by all ranks into one folder)."""


def validate(config: RunConfig) -> None:
    """Run every section's own checks; their ValueErrors name the key."""
    for section in (config.model, config.data, config.optim, config.train, config.logging):
        if hasattr(section, "validate"):
            try:
                section.validate()
            except ValueError as error:
                raise ConfigError(str(error)) from None
    if not config.output_dir:
        raise ConfigError("output_dir: must not be empty")


def resolve_config_path(path: str | Path) -> Path:
    """`path` as given, or else a recipe shipped with the package (so `--config cpu-demo.yaml` or
    `--config configs/cpu-demo.yaml` work from any folder once installed)."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / path.name
    if packaged.is_file():
        return packaged
    shipped = ", ".join(sorted(p.name for p in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file {str(path)!r} not found (recipes shipped with cmaclip: {shipped})")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Defaults <- YAML file at `path` <- `key.sub=value` overrides, converted and validated."""
    tree: dict = {}
    if path is not None:
        resolved = resolve_config_path(path)
        try:
            tree = yaml.safe_load(resolved.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{resolved}: not valid YAML: {error}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{resolved}: expected a mapping of config keys at the top level")
        config = build(RunConfig, tree, source=str(resolved))
    else:
        config = RunConfig()
    for override in overrides:
        config = apply_override(config, override)
    validate(config)
    return config


def apply_override(config: RunConfig, override: str) -> RunConfig:
    """A new config with one `key.sub=value` applied (the value is typed by the field)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key.sub=value")
    tree = to_dict(config)
    node, names = tree, key.split(".")
    for name in names[:-1]:
        child = node.get(name) if isinstance(node, dict) else None
        if child is None:
            node[name] = child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {name!r} is a value, not a section")
        node = child
    node[names[-1]] = value
    return build(RunConfig, tree, source="the command line")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: RunConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def build(cls, values: dict, source: str, prefix: str = ""):
    """Instantiate dataclass `cls` from a nested dict, converting each value to its field's type."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping in {source}, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(fields)})"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
        kwargs[name] = convert(value, hints[name], key, source)
    try:
        return cls(**kwargs)
    except ValueError as error:  # a section's own checks (they name the key)
        raise ConfigError(f"{error} (in {source})") from None


def convert(value, annotation, key: str, source: str):
    """`value` (from YAML, or a string from the command line) as an instance of `annotation`."""
    if dataclasses.is_dataclass(annotation):
        return build(annotation, value, source, prefix=f"{key}.")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        options = [a for a in args if a is not type(None)]
        return convert(value, options[0], key, source)
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip() else {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping in {source}, got {value!r}")
        key_type, value_type = args or (str, typing.Any)
        return {convert(k, key_type, f"{key}.{k}", source): convert(v, value_type, f"{key}.{k}", source)
                for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list in {source}, got {value!r}")
        item_type = args[0] if args else typing.Any
        return origin(convert(item, item_type, key, source) for item in value)
    if annotation is typing.Any:
        return value
    return convert_scalar(value, annotation, key, source)


def convert_scalar(value, annotation, key: str, source: str):
    wrong = ConfigError(f"{key}: expected {annotation.__name__} in {source}, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise wrong
    if annotation is int:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise wrong from None
        raise wrong
    if annotation is float:
        # YAML 1.1 reads 1e-4 (no dot) as a string, so strings are parsed here too.
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        raise wrong
    if annotation is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise wrong
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")


def field_docs(cls) -> dict[str, str]:
    """The docstring written under each field of dataclass `cls` (read from its source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for statement, following in zip(body, body[1:]):
        if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[statement.target.id] = inspect.cleandoc(following.value.value)
    return docs


def keys_reference(cls=RunConfig, prefix: str = "") -> str:
    """Every config key with its default and docstring: the text of `cmaclip train --keys` (and docs/CONFIG.md)."""
    lines = []
    docs = field_docs(cls)
    defaults = cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"\n{key}.*: {docs.get(f.name, '')}")
            lines.append(keys_reference(hints[f.name], prefix=f"{key}."))
            continue
        default = getattr(defaults, f.name)
        lines.append(f"  {key} = {default!r}")
        lines += [f"      {line}" for line in textwrap.wrap(docs.get(f.name, ""), 90)]
    return "\n".join(lines)
