"""Elastic resume: a checkpoint written by N processes continues on M != N (a node was lost, or
came back). checkpoint.load_checkpoint calls `load` when the world sizes differ.

- Weights, optimizer and scheduler. Under DDP (and on one process) every rank saved the whole
  state, so accelerator.load_state reads it as it is. ZeRO partitions the optimizer state by rank
  (ZeRO-3 the weights too): rank 0 first converts the checkpoint's DeepSpeed folder into DeepSpeed's
  universal checkpoint (fp32 weights and Adam moments per parameter, `ds_to_universal`) in a
  staging folder beside it, and every rank loads its new partition from there; the staging folder
  is removed afterwards.
- Data. Every saved rank's loader state goes to the loader (BatchLoader.load_elastic_state): the
  samples of the interrupted epoch that no rank consumed are shared among the M ranks, so the epoch
  still reads every sample exactly once; later epochs follow the usual rule for M ranks.
- Random state. The saved generator states belong to the old ranks: every rank is reseeded from
  (train.seed, step, rank) instead. An elastic resume is deterministic, but not bitwise equal to an
  uninterrupted run (nor could it be: the batches differ).
"""
from __future__ import annotations

import argparse
import os
import shutil
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np

from cmaclip.distributed import all_ranks_ok


def load(accelerator, checkpoint: Path, deepspeed_tag: str, step: int, loader, loader_states: list[dict]) -> None:
    """Restore `checkpoint` (saved at `step` by len(loader_states) processes) on this run's
    processes. deepspeed_tag: the checkpoint's DeepSpeed folder."""
    if accelerator.state.deepspeed_plugin is not None:
        load_zero_universal(accelerator, checkpoint, deepspeed_tag)
    else:
        accelerator.load_state(str(checkpoint))
    reseed(loader.seed, step, accelerator.process_index)
    loader.load_elastic_state(loader_states)


def reseed(seed: int, step: int, rank: int) -> None:
    from accelerate.utils import set_seed

    set_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0] & 0x7FFFFFFF))


def load_zero_universal(accelerator, checkpoint: Path, deepspeed_tag: str) -> None:
    """accelerator.load_state from a universal copy of the checkpoint's ZeRO partitions."""
    universal = checkpoint.parent / f".tmp-universal-{checkpoint.name}"
    failure = None
    if accelerator.is_main_process:
        try:
            shutil.rmtree(universal, ignore_errors=True)
            universal.mkdir()
            for entry in checkpoint.iterdir():  # the scheduler and RNG files, as they are
                if entry.name != deepspeed_tag:
                    (universal / entry.name).symlink_to(entry.resolve())
            convert_to_universal(checkpoint / deepspeed_tag, universal / deepspeed_tag)
        except Exception as error:  # noqa: BLE001 -- every rank must learn of it, not wait forever
            failure = error
            shutil.rmtree(universal, ignore_errors=True)
    if not all_ranks_ok(accelerator, failure is None):
        raise RuntimeError(f"converting {checkpoint / deepspeed_tag} to a universal checkpoint failed"
                           f"{f': {failure}' if failure else ' on rank 0'}") from failure
    engines = [model for model in accelerator._models if hasattr(model, "load_universal_checkpoint")]
    try:
        for engine in engines:
            engine._config.load_universal_checkpoint = True
        accelerator.load_state(str(universal))
        for engine in engines:
            restore_group_settings(engine.optimizer, universal / deepspeed_tag / "zero" / "optimizer_state.pt")
    finally:
        for engine in engines:
            engine._config.load_universal_checkpoint = False
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            shutil.rmtree(universal, ignore_errors=True)


def restore_group_settings(optimizer, saved_state: Path) -> None:
    """DeepSpeed's ZeRO-3 universal loader gives every parameter group the settings of group 0 (lr,
    weight_decay, our `part`: stage3.py assumes they are all alike): put back each group's own.
    (ZeRO-2's loader restores them itself; this changes nothing there.)"""
    import torch

    saved = torch.load(saved_state, weights_only=False)["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        raise RuntimeError(f"{saved_state} has {len(saved)} parameter groups, the optimizer {len(optimizer.param_groups)}")
    for group, settings in zip(optimizer.param_groups, saved):
        group.update({key: value for key, value in settings.items() if key != "params"})


def convert_to_universal(source: Path, target: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    arguments = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                                   num_merge_workers=1, keep_temp_folder=False, strict=True,
                                   inject_missing_state=True)  # Accelerate's checkpoints lack its metadata
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):  # its progress prints
        ds_to_universal.main(arguments)
