"""Process-group set-up for every launcher: one process, `accelerate launch` (DDP or DeepSpeed),
several nodes, with or without CUDA.

What this file settles (the failure behind each rule is told where the rule is applied):
- The device is what the launch asked for (use_cpu, or no visible GPU: CUDA_VISIBLE_DEVICES=), and
  it decides the rest: on the CPU the process group is gloo (a DeepSpeed launch needs it passed
  explicitly, or it runs every process as an unsharded rank 0) and `auto` precision is fp32.
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
import socket
import sys
import warnings

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, parse_flag_from_env

from cmaclip import errors
from cmaclip.config import ConfigError, RunConfig


def free_port() -> int:
    """A TCP port free on this host now, for a launch on one machine (tests, benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_accelerator(config: RunConfig) -> Accelerator:
    device = launch_device()
    if not config.train.cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    if device == "cpu":
        # DeepSpeed would otherwise probe for GPUs and warn that it fell back to the CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    launched = int(os.environ.get("WORLD_SIZE", 1)) > 1
    deepspeed = parse_flag_from_env("ACCELERATE_USE_DEEPSPEED")
    if deepspeed and device == "cpu":
        skip_deepspeed_shm_op()
    if device == "cuda":
        # TF32 tensor cores for the fp32 matrix products left outside bf16 autocast (and for
        # mixed_precision=no): about 8x an A100's fp32 rate, at a 10-bit mantissa
        torch.set_float32_matmul_precision("high")
    accelerator = Accelerator(
        # cpu=True selects Accelerate's MULTI_CPU set-up, which skips DeepSpeed's: a DeepSpeed
        # launch without CUDA lands on the CPU anyway, through the gloo backend below
        cpu=device == "cpu" and not deepspeed,
        mixed_precision=resolve_mixed_precision(config.train.mixed_precision, device),
        gradient_accumulation_steps=config.train.grad_accum_steps,
        # the schedule counts optimizer steps; the default would advance it once per process
        step_scheduler_with_optimizer=False,
        dynamo_backend="inductor" if config.train.compile else "no",
        # a single process has no process group at all; naming a backend would ask for one
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if launched and device == "cpu" else [],
    )
    if accelerator.device.type != device:
        raise RuntimeError(f"the launch asked for {device} but Accelerate set up {accelerator.device}: "
                           f"hide the GPUs (CUDA_VISIBLE_DEVICES=) or drop use_cpu from the accelerate config")
    check_world_size(accelerator)
    return accelerator


def launch_device() -> str:
    """The device the launch asked for: cpu when the launcher says so (an accelerate config with
    `use_cpu: true`, or `--cpu`: ACCELERATE_USE_CPU) or no GPU is visible (none, or
    CUDA_VISIBLE_DEVICES=), else cuda."""
    if parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def resolve_mixed_precision(requested: str, device: str) -> str:
    """train.mixed_precision -> Accelerate's: auto = bf16 on a GPU that computes in bf16 natively
    (Ampere and newer); V100 / T4 only emulate it, slower than fp32, so they get fp32."""
    if requested != "auto":
        return requested
    native = device == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16" if native else "no"


def skip_deepspeed_shm_op() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at every init until it is
    cached (docs/MEASUREMENTS.md: how long). Only inference_all_reduce uses it, never training, so it
    is marked unavailable; DeepSpeed then uses plain gloo collectives."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def check_world_size(accelerator: Accelerator) -> None:
    expected = int(os.environ.get("WORLD_SIZE", 1))
    if accelerator.num_processes != expected:
        raise ConfigError(
            f"the launcher asked for {expected} processes (WORLD_SIZE) but Accelerate set up "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): on a CPU-only machine use "
            f"launchers/accelerate/cpu.yaml (distributed_type MULTI_GPU + use_cpu), see launchers/README.md")


def all_ranks_ok(accelerator: Accelerator, ok: bool) -> bool:
    """True when `ok` holds on every rank (every rank must call it)."""
    if accelerator.num_processes == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=accelerator.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def uses_deepspeed(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


# DeepSpeed's bucket sizes, in elements: tens of millions, so that a backward pass of a ViT-B
# preset (157 M parameters) is reduced in a handful of collectives and ZeRO-3 prefetches several
# layers ahead (bench/collectives.py counts them), while the buffers stay near 100 MB each in fp32
# (DeepSpeed's 5e8 default takes about 2 GiB per rank on its own).
BUCKET_ELEMENTS = 25_000_000


def fill_deepspeed_config(accelerator: Accelerator, config: RunConfig, hidden_size: int) -> None:
    """Replace the ds_config's "auto" values with ours (explicit values in the file are kept).

    hidden_size: the model's widest layer; ZeRO-3 keeps parameters smaller than 10 x hidden_size
    (biases, norms) whole on every rank instead of gathering them one by one.
    """
    plugin = accelerator.state.deepspeed_plugin
    micro_batch = config.train.batch_size
    accumulation = config.train.grad_accum_steps
    # bf16 gradients summed over several micro-batches lose the small ones: ZeRO-2/3 accumulate
    # them in fp32. Not ZeRO-1: DeepSpeed swaps it for its BF16_Optimizer then, whose checkpoints
    # its own zero_to_fp32 (our export) refuses ("... is not a zero checkpoint").
    fp32_accumulation = accelerator.mixed_precision != "bf16" or (accumulation > 1 and plugin.zero_stage >= 2)
    plugin.deepspeed_config_process(
        must_match=False,
        train_micro_batch_size_per_gpu=micro_batch,
        gradient_accumulation_steps=accumulation,
        train_batch_size=micro_batch * accumulation * accelerator.num_processes,
        gradient_clipping=config.optim.grad_clip,
        **{
            "data_types.grad_accum_dtype": "fp32" if fp32_accumulation else "bf16",
            "zero_optimization.reduce_bucket_size": BUCKET_ELEMENTS,
            "zero_optimization.allgather_bucket_size": BUCKET_ELEMENTS,
            "zero_optimization.stage3_prefetch_bucket_size": BUCKET_ELEMENTS,
            "zero_optimization.stage3_param_persistence_threshold": 10 * hidden_size,
        },
    )
    # the loop counts micro-batches itself: a ds_config that fixes other values would desync it
    for key, ours in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_accumulation_steps", accumulation)):
        theirs = plugin.get_value(key)
        if theirs != ours:
            raise ConfigError(f"the DeepSpeed config sets {key}={theirs} but the run config says {ours} "
                              f"(train.batch_size / train.grad_accum_steps): set it to \"auto\" in the ds_config")


def adamw_implementation(accelerator: Accelerator) -> dict:
    """torch AdamW's fastest kernel where it steps: fused on CUDA, multi-tensor (foreach) on the
    CPU; the plain one under ZeRO optimizer offload, where Accelerate swaps it for DeepSpeed's
    CPUAdam (which takes neither option)."""
    if uses_deepspeed(accelerator):
        zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
        if zero.get("offload_optimizer", {}).get("device", "none") != "none":
            return {}
    return {"fused": True} if accelerator.device.type == "cuda" else {"foreach": True}


# Warnings that say why a GPU run is slow or stuck: which attention kernel torch could not use,
# and NCCL's. quiet_libraries lets them through.
TELLING_WARNINGS = r".*(scaled_dot_product|flash|memory.efficient|cudnn|kernel not used|nccl)"  # any case


def quiet_libraries() -> None:
    """Warnings and info logs of the libraries down to errors, but for TELLING_WARNINGS: the run's
    own output stays readable."""
    import transformers

    transformers.logging.set_verbosity_error()
    # not torch.distributed: NCCL's warnings come through it
    for name in ("DeepSpeed", "deepspeed", "accelerate", "torch.distributed.elastic",
                 "torch._dynamo", "torch._logging"):  # train.compile: one expected graph break per step
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(torch|accelerate|deepspeed|transformers)\b")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("default", message=TELLING_WARNINGS)  # added last: checked first


def shutdown(accelerator: Accelerator, wait: bool = True) -> None:
    """wait=False after an error: the other ranks may never reach a barrier."""
    if wait:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopRequest:
    """SIGUSR1 or SIGTERM -> stop cleanly at the next check, on all ranks at the same step.

    Slurm sends SIGUSR1 before a time limit (--signal) and SIGTERM on scancel, preemption and a
    time limit without --signal; torchrun's agent passes SIGTERM on when its own launcher is
    stopped. The signal may reach only some ranks (one node of several) or reach them during
    different steps, so each check (train.py: every logging.log_every steps) agrees on it with one
    tiny all-reduce (MAX) before anyone acts.
    """

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM)):
        self.requested = False
        for sig in signals:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        errors.received_signal = signal.Signals(signum).name

    def agreed(self, accelerator: Accelerator) -> bool:
        return not all_ranks_ok(accelerator, not self.requested)  # requested on any rank


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
