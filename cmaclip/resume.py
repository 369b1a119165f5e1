"""Resuming safely: which checkpoint, and whether this run's config may continue it.

- Every checkpoint records the config that wrote it (RunState.config, in trainer_state.json). A resumed run
  compares it with its own key by key: a key that changes what the weights, the optimizer state
  or the data position mean (MUST_MATCH) is refused in one line naming the keys; any other change
  (learning rate, max_steps, workers, ...) is allowed and listed.
- `train.resume=auto` takes the newest checkpoint that loads: one that cannot be read (a damaged
  or missing file on any rank) is named with the reason and the next older one is tried. All ranks
  agree on each attempt, so they resume from the same one. A checkpoint whose model has other
  parameters than this run's (another cmaclip's save format, other classes) is not damaged: the
  resume stops in one line naming them, as an older checkpoint would not fit either.
- output_dir/config.yaml is the first start's config, never overwritten; a later start whose
  config differs from the newest recorded one adds config-2.yaml, config-3.yaml, ...
"""
from __future__ import annotations

from pathlib import Path

from cmaclip import checkpoint
from cmaclip.config import ConfigError, RunConfig, to_dict, to_yaml
from cmaclip.distributed import all_ranks_ok
from cmaclip.errors import CmaclipError

# Keys whose change would silently reinterpret a checkpoint (model.fusion_heads 4 -> 8 loads the
# same tensors as other heads) or break the resumed data position (batch size, seed, split).
MUST_MATCH = (
    "model.preset", "model.fusion", "model.fusion_layers", "model.fusion_heads", "model.mlp_ratio",
    "model.head_hidden", "model.image_size", "model.context_length",
    "train.batch_size", "train.grad_accum_steps", "train.seed", "data.train_split",
)


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "task_weights":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def compare(saved: dict, current: RunConfig, source: Path) -> list[str]:
    """Raise ConfigError for must-match differences; -> 'key: saved -> now' for the others."""
    before, now = flatten(saved), flatten(to_dict(current))
    changed = sorted(key for key in before.keys() | now.keys() if before.get(key) != now.get(key))
    refused = [key for key in changed if key in MUST_MATCH]
    if refused:
        details = ", ".join(f"{key} (saved {before.get(key)!r}, now {now.get(key)!r})" for key in refused)
        raise ConfigError(f"cannot resume {source}: {details} must stay as saved; keep them, or start a new "
                          f"output_dir")
    return [f"{key}: {before.get(key)!r} -> {now.get(key)!r}" for key in changed
            if key not in ("train.resume", "output_dir")]


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


def model_misfit(error: BaseException) -> str | None:
    """The first lines of torch's load_state_dict refusal (missing, unexpected or resized
    parameters), which Accelerate and DeepSpeed pass on unchanged; None for any other error."""
    text = str(error)
    if "Error(s) in loading state_dict" not in text:
        return None
    details = [line.strip().rstrip(".") for line in text.splitlines()[1:] if line.strip()]
    return "; ".join(details[:2])[:240]


def load(accelerator, config: RunConfig, requested: Path, loader, log) -> tuple[Path, checkpoint.RunState]:
    """Load `requested`, or (train.resume=auto) the newest checkpoint that loads. -> (path, its state)."""
    if config.train.resume == "auto":
        candidates = checkpoint.list_checkpoints(config.output_dir)[::-1]
    else:
        candidates = [requested]
    skipped = []
    for path in candidates:
        try:
            saved = checkpoint.read_run_state(path)
        except (OSError, ValueError) as error:
            skipped.append(f"{path.name} ({first_line(error)})")
            continue
        if saved.config is not None:
            for change in compare(saved.config, config, path):
                log(f"config changed since {path.name}: {change}")
        try:
            state, error = checkpoint.load_checkpoint(accelerator, path, loader), None
        except CmaclipError:  # a config or data mismatch: an older checkpoint would not do either
            raise
        except Exception as failure:  # noqa: BLE001 -- a damaged file shows as any error of the library reading it
            state, error = None, failure
            if misfit := model_misfit(failure):
                raise checkpoint.CheckpointError(
                    f"cannot resume {path}: its model has other parameters than this run's ({misfit}); it was "
                    "written by another cmaclip version or for other tasks; start a new output_dir") from failure
        if all_ranks_ok(accelerator, error is None):
            if skipped:
                log(f"skipped checkpoint(s) that do not load: {'; '.join(skipped)}")
            return path, state
        skipped.append(f"{path.name} ({first_line(error) if error else 'failed on another rank'})")
        if config.train.resume != "auto":
            break
    raise checkpoint.CheckpointError(f"no checkpoint of {config.output_dir} loads: {'; '.join(skipped)}; "
                                     "delete the damaged ones or start a new output_dir")


def record_config(output_dir: Path, config: RunConfig) -> Path | None:
    """Keep this start's config (see the module docstring). -> the file written, or None."""
    text = to_yaml(config)
    first = output_dir / checkpoint.RUN_CONFIG_FILE
    numbered = sorted(output_dir.glob("config-*.yaml"), key=lambda p: int(p.stem.split("-")[1])
                      if p.stem.split("-")[1].isdigit() else 0)
    newest = numbered[-1] if numbered else first
    if newest.is_file() and newest.read_text() == text:
        return None
    target = first if not first.exists() else output_dir / f"config-{len(numbered) + 2}.yaml"
    target.write_text(text)
    return target
