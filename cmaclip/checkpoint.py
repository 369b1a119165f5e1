"""The layout of output_dir and everything that reads or writes it: checkpoints (atomic save,
keep-last-K, `train.resume=auto|PATH|''`), the export of the final model, finding and loading an
exported model. Other modules take these names from here.

Layout under output_dir:

    checkpoints/step-000000500/     one resumable state (accelerator.save_state: model, optimizer,
        trainer_state.json          scheduler, RNG of every rank; DeepSpeed: its ZeRO partitions)
        loader-rank00000.json       + the RunState: each rank's loader position (JSON; checkpoints
        ...                         before it have loader-rank00000.pt), and trainer_state.json
                                    (written last: step, world size, config; another world size
                                    resumes elastically)
    checkpoints/.tmp-step-.../      a save in progress (or one that crashed): never read
    model/                          the exported model (CMAClip.from_pretrained):
        config.json                     model config + tasks + CLIP config
        model.safetensors               fp32 weights
        calibration.json                `cmaclip calibrate`'s thresholds, if fitted (calibration.py)
    tensorboard/                    event files (train; eval-<split>/ from `cmaclip eval`)
    train.log                       the run's notices, every start appended (runlog.py)
    config.yaml, config-2.yaml ...  the config of each start that changed it (resume.py)
    LOCK                            held by the running training (runlock.py)
    PREEMPTED                       the step a signalled run stopped at (Slurm requeues on it)

A save writes into a temporary folder and renames it into place only after every rank has
finished, so a crash during a save leaves the previous checkpoint as the newest complete one.
Every checkpoint folder must be on a filesystem all nodes share.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import torch

from cmaclip import elastic
from cmaclip.config import ConfigError
from cmaclip.errors import CmaclipError, DataError, disk_error
from cmaclip.model.cmaclip import CMAClip
# the model library writes these two (it never imports the trainer); every other reader takes them from here
from cmaclip.model.cmaclip import CONFIG_FILE as MODEL_CONFIG_FILE
from cmaclip.model.cmaclip import WEIGHTS_FILE as MODEL_WEIGHTS_FILE

CHECKPOINTS_DIR = "checkpoints"
MODEL_DIR = "model"
TENSORBOARD_DIR = "tensorboard"
TRAIN_LOG = "train.log"
RUN_CONFIG_FILE = "config.yaml"
LOCK_FILE = "LOCK"
PREEMPTED_MARKER = "PREEMPTED"
TRAINER_STATE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
# accelerator.save_state names the first (only) DeepSpeed model's checkpoint tag like this.
DEEPSPEED_TAG = "pytorch_model"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(CmaclipError):
    """No usable checkpoint where one was asked for."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:09d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once it has its final name)."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint `train.resume` asks for, or None to start fresh."""
    if resume == "auto":
        return latest_checkpoint(output_dir)
    if not resume:
        existing = latest_checkpoint(output_dir)
        if existing is not None:
            raise ConfigError(
                f"train.resume is empty but {existing} exists: set train.resume=auto to continue that "
                f"run, or choose another output_dir")
        return None
    path = Path(resume)
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(f"train.resume: {resume!r} is not a checkpoint folder (no {TRAINER_STATE} in it)")
    return path


@dataclass
class RunState:
    """What a checkpoint holds besides accelerator.save_state's model, optimizer, scheduler and RNG
    (as open_clip's TrainState, litgpt's state dict): save and resume go through it, so a new
    checkpoint field is a new field here. `loader` is per rank (loader-rankNNNNN.json); the other
    fields are the run's (trainer_state.json, written by rank 0)."""

    step: int
    world_size: int
    config: dict | None = None
    """config.to_dict(RunConfig) of the start that saved it (resume.py compares it with its own)."""
    loader: dict | None = None
    """This rank's loader.state_dict(): its data position (ARCHITECTURE.md, "Batch")."""

    def run_fields(self) -> dict:
        """trainer_state.json's content (fields left None are left out)."""
        return {key: value for key, value in dataclasses.asdict(self).items()
                if key != "loader" and value is not None}


def read_run_state(checkpoint: str | Path) -> RunState:
    """A checkpoint's trainer_state.json (without a loader state). ValueError for one that is not a
    RunState, as for a truncated file: resume.py then treats the checkpoint as damaged."""
    path = Path(checkpoint) / TRAINER_STATE
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a JSON object")
    fields = [field for field in dataclasses.fields(RunState) if field.name != "loader"]
    unknown = sorted(set(saved) - {field.name for field in fields})
    if unknown:
        raise ValueError(f"{path}: unknown entries {unknown} (written by a newer cmaclip?)")
    missing = [field.name for field in fields if field.default is dataclasses.MISSING and field.name not in saved]
    if missing:
        raise ValueError(f"{path}: missing entries {missing}")
    return RunState(**saved)


def loader_state_name(rank: int) -> str:
    return f"loader-rank{rank:05d}.json"


def read_loader_state(checkpoint: Path, rank: int) -> dict:
    """Rank `rank`'s loader state. Checkpoints written before the JSON files hold a pickled
    loader-rankNNNNN.pt: read with torch's restricted unpickler (plain containers, numbers and
    strings only; never arbitrary objects)."""
    path = checkpoint / loader_state_name(rank)
    legacy = path.with_suffix(".pt")
    if not path.is_file() and legacy.is_file():
        return torch.load(legacy, weights_only=True)
    return json.loads(path.read_text())


def save_checkpoint(accelerator, output_dir: str | Path, state: RunState, keep_last: int) -> Path:
    """Every rank calls this at the same step with its own `state`. Returns the checkpoint folder.
    A failed write (disk full) removes the staging folder, so it does not keep the disk full, and
    raises DiskError naming it and the free space."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    final = root / checkpoint_name(state.step)
    staging = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        remove_stale_staging(root)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()

    with cleaned_up_on_failure(staging):
        accelerator.save_state(str(staging))
        (staging / loader_state_name(accelerator.process_index)).write_text(json.dumps(state.loader) + "\n")
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        with cleaned_up_on_failure(staging):
            (staging / TRAINER_STATE).write_text(json.dumps(state.run_fields(), indent=1) + "\n")
        if final.exists():  # saved before (a resumed run that ends where it resumed): swap it out
            replaced = root / f"{TMP_PREFIX}old-{final.name}"
            final.rename(replaced)
            staging.rename(final)
            shutil.rmtree(replaced)
        else:
            staging.rename(final)
        prune(root, keep_last)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def cleaned_up_on_failure(staging: Path):
    """torch.save reports a full disk as a RuntimeError ("file write failed", "basic_ios::clear"),
    safetensors as SafetensorError, DeepSpeed as OSError: all of them end the save here."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise disk_error(staging, error) from error


def load_checkpoint(accelerator, checkpoint: str | Path, loader) -> RunState:
    """Restore model, optimizer, scheduler, RNG and this rank's loader position; -> the RunState.
    A checkpoint of another number of processes resumes elastically (elastic.py)."""
    checkpoint = Path(checkpoint)
    state = read_run_state(checkpoint)
    if state.world_size != accelerator.num_processes:
        loader_states = [read_loader_state(checkpoint, rank) for rank in range(state.world_size)]
        elastic.load(accelerator, checkpoint, DEEPSPEED_TAG, state.step, loader, loader_states)
        return state
    accelerator.load_state(str(checkpoint))
    state.loader = read_loader_state(checkpoint, accelerator.process_index)
    loader.load_state_dict(state.loader)
    return state


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints."""
    for old in list_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old)


def remove_stale_staging(root: Path) -> None:
    """Staging folders of saves that never finished (a crash, a kill): nothing reads them."""
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path)


def export_model(accelerator, model, checkpoint: Path, output_dir: str | Path) -> Path:
    """Write output_dir/model/ (consolidated fp32 weights + config) from the final state.

    Under DeepSpeed the fp32 master weights live partitioned in the optimizer states (ZeRO-3 also
    partitions the parameters themselves), so the main process gathers them from the checkpoint
    just written; otherwise the unwrapped model is whole and fp32 already. Every rank calls this.
    """
    target = Path(output_dir) / MODEL_DIR
    staging = Path(output_dir) / f"{TMP_PREFIX}{MODEL_DIR}"
    if accelerator.is_main_process:
        if staging.exists():
            shutil.rmtree(staging)
        state_dict = None
        if accelerator.state.deepspeed_plugin is not None:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):  # its progress prints
                state_dict = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DEEPSPEED_TAG)
        with cleaned_up_on_failure(staging):
            accelerator.unwrap_model(model).save_pretrained(staging, state_dict=state_dict)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    accelerator.wait_for_everyone()
    return target


# ---- an exported model -----------------------------------------------------------------------------

def resolve_model_dir(checkpoint: str | Path) -> Path:
    """An exported model folder (config.json + model.safetensors), given it or its output_dir."""
    path = Path(checkpoint)
    for candidate in (path, path / MODEL_DIR):
        if (candidate / MODEL_CONFIG_FILE).is_file() and (candidate / MODEL_WEIGHTS_FILE).is_file():
            return candidate
    raise FileNotFoundError(f"{path}: no exported model ({MODEL_CONFIG_FILE} + {MODEL_WEIGHTS_FILE}) here or in "
                            f"{path / MODEL_DIR}; pass a training output_dir or its {MODEL_DIR}/ folder")


def load_model(checkpoint: str | Path, device="cpu"):
    """The exported CMAClip of an output_dir or a model folder, in eval mode on `device`."""
    model_dir = resolve_model_dir(checkpoint)
    model = CMAClip.from_pretrained(model_dir)
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:  # its predictions would be NaN, which is not even valid JSON
        raise DataError(f"{model_dir}: {len(broken)} weight tensors hold NaN/inf (first: {broken[0]}): "
                        "the run that wrote it diverged; export an earlier checkpoint")
    return model.to(device).eval()
