"""Process-group set-up for every launcher: one process, `accelerate launch` (DDP or DeepSpeed),
several nodes, with or without CUDA.

What this file settles (see PLATFORM-NOTES.md for the failures behind each rule):
- Without CUDA the process group is gloo and Accelerate runs on the CPU; a DeepSpeed launch needs
  the gloo backend passed explicitly, or it runs every process as an unsharded rank 0.
- A launcher that silently started fewer processes than it was told (WORLD_SIZE) is an error.
- DeepSpeed's "auto" config values are filled from our config, since the data loader is not
  passed to `accelerator.prepare` (it is already sharded per rank) and Accelerate cannot infer
  them from it.
- ZeRO-3 sometimes aborts at interpreter exit unless the process group is destroyed first.
- SIGUSR1 (Slurm's warning before the time limit) or SIGTERM asks every rank to stop at the same
  step; a rank whose launcher dies gets SIGTERM (it never trains on as an orphan).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import warnings

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from cmaclip import errors
from cmaclip.config import ConfigError, RunConfig


def make_accelerator(config: RunConfig) -> Accelerator:
    cuda = torch.cuda.is_available()
    if not cuda:
        # DeepSpeed would otherwise probe for GPUs and warn that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    mixed_precision = config.train.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if deepspeed and not cuda:
        skip_deepspeed_shm_op()
    if cuda:
        # TF32 tensor cores for the fp32 matrix products left outside bf16 autocast (and for
        # mixed_precision=no): about 8x an A100's fp32 rate, at a 10-bit mantissa
        torch.set_float32_matmul_precision("high")
    accelerator = Accelerator(
        # cpu=True selects Accelerate's MULTI_CPU set-up, which skips DeepSpeed's: a DeepSpeed
        # launch without CUDA lands on the CPU anyway, through the gloo backend below
        cpu=not cuda and not deepspeed,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.train.grad_accum_steps,
        # the schedule counts optimizer steps; the default would advance it once per process
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.train.compile else "no",
        # a single process has no process group at all; naming a backend would ask for one
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched and not cuda else [],
    )
    check_world_size(accelerator)
    return accelerator


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at every init until it is
    cached (about 40 s, minutes on a busy machine). Only inference_all_reduce uses it, never
    training, so it is marked unavailable; DeepSpeed then uses plain gloo collectives."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def check_world_size(accelerator: Accelerator) -> None:
    expected = int(os.environ.get("WORLD_SIZE", 1))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"the launcher asked for {expected} processes (WORLD_SIZE) but Accelerate set up "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): on a CPU-only machine use "
            f"launchers/accelerate/cpu.yaml (distributed_type MULTI_GPU + use_cpu), see launchers/README.md")


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def fill_deepspeed_config(accelerator: Accelerator, config: RunConfig, hidden_size: int) -> None:
    """Replace the ds_config's "auto" values with ours (explicit values in the file are kept).

    hidden_size: the model's widest layer; the bucket sizes follow the HF Trainer's rule
    (hidden^2), which keeps them near one layer's gradients instead of DeepSpeed's 5e8-element
    default (about 2 GiB of buffers per rank on its own).
    """
    plugin = accelerator.state.deepspeed_plugin
    micro_batch = config.train.batch_size
    accumulation = config.train.grad_accum_steps
    plugin.deepspeed_config_process(
        must_match=False,
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro_batch * accumulation * accelerator.num_processes,
        gradient_clipping=config.optim.grad_clip,
        **{
            "zero_optimization.reduce_bucket_size": hidden_size * hidden_size,
            "zero_optimization.allgather_bucket_size": hidden_size * hidden_size,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        },
    )
    # the loop counts micro-batches itself: a ds_config that fixes other values would desync it
    for key, ours in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", accumulation)):
        theirs = plugin.get_value(key)
        if theirs != ours:
            raise ConfigError(f"the DeepSpeed config sets {key}={theirs} but the run config says {ours} "
                              f"(train.batch_size / train.grad_accum_steps): set it to \"auto\" in the ds_config")


def quiet_libraries() -> None:
    """Warnings and info logs of the libraries down to errors: the run's own output stays readable."""
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed", "torch.distributed.elastic",
                 "torch._dynamo", "torch._logging"):  # train.compile: one expected graph break per step
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|accelerate|deepspeed|transformers)\b")
    warnings.filterwarnings("ignore", category=FutureWarning)


def shutdown(accelerator: Accelerator, wait: bool = True) -> None:
    """wait=False after an error: the other ranks may never reach a barrier."""
    if wait:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopRequest:
    """SIGUSR1 or SIGTERM -> stop cleanly at the next step boundary, on all ranks at the same step.

    Slurm sends SIGUSR1 before a time limit (--signal) and SIGTERM on scancel, preemption and a
    time limit without --signal; torchrun's agent passes SIGTERM on when its own launcher is
    stopped. The signal may reach only some ranks (one node of several) or reach them during
    different steps, so each step boundary agrees on it with one tiny all-reduce (MAX) before
    anyone acts.
    """

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.requested = False
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        errors.received_signal = signal.Signals(signum).name

    def agreed(self, accelerator: Accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def die_with_launcher() -> None:
    """Ask Linux to send this process SIGTERM when its parent (the launcher) dies, by any signal,
    kill -9 included, so a rank is never left training on its own: SIGTERM is a stop request, so
    it saves a checkpoint and exits. Nothing to do without a launcher or off Linux."""
    if os.environ.get("LOCAL_RANK") is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the request: nothing trained yet, just end
        os.kill(os.getpid(), signal.SIGTERM)


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of `tensor` from every rank, concatenated in rank order, with the gradient of the
    result flowing back to each rank's own rows (summed over the ranks that used them): the
    contrastive losses' global batch. One process: `tensor` itself. Works on gloo and NCCL."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as differentiable

    with warnings.catch_warnings():  # deprecated for a private API that has no gloo backward yet
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cat(differentiable.all_gather(tensor), dim=0)
