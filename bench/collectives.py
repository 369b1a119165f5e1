"""Collective calls per training step under DeepSpeed ZeRO-2 and ZeRO-3, with the bucket sizes of
the old rule (hidden², 0.59 M elements for the B/16 width) and of the trainer's BUCKET_ELEMENTS.

Two CPU processes (gloo) train CMA-CLIP with the shipped ds_configs/zero{2,3}.json, bf16 and fp32
communication, their "auto" values filled as cmaclip.distributed.fill_deepspeed_config fills them
(only the bucket sizes differ between the two columns). Every torch.distributed collective is
wrapped in a counting shim before DeepSpeed starts, so each call DeepSpeed makes is counted (one
Python call each; NCCL may still fuse the calls DeepSpeed issues inside a coalescing manager).
A step = forward + backward + optimizer step; steps 2 and 3 are counted (the first one builds
DeepSpeed's buffers), on rank 0.

    .venv/bin/python bench/collectives.py [--preset vit-b-16] [--steps 3]

Last line: the collective calls per ZeRO-2 step (the Slurm and gpu-zero2 default), old bucket
rule / BUCKET_ELEMENTS.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
REPO = Path(__file__).resolve().parent.parent
TASKS = {"category": [f"c{i}" for i in range(20)], "colour": [f"k{i}" for i in range(30)]}
COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor",
               "_reduce_scatter_base", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "all_gather_object", "broadcast", "broadcast_object_list", "all_to_all_single", "barrier")


def count_collectives() -> collections.Counter:
    """Wrap torch.distributed's collectives (both names each is reachable under) in a counter."""
    calls = collections.Counter()
    c10d = dist.distributed_c10d
    for name in COLLECTIVES:
        original = getattr(c10d, name, None)
        if original is None:
            continue

        @functools.wraps(original)
        def counted(*args, __name=name, __original=original, **kwargs):
            calls[__name] += 1
            return __original(*args, **kwargs)

        setattr(c10d, name, counted)
        if hasattr(dist, name):
            setattr(dist, name, counted)
    return calls


def ds_config(stage: int, buckets: int, hidden: int, micro_batch: int) -> dict:
    """The shipped ds_config with its "auto" values filled like the trainer does, buckets aside."""
    config = json.loads((REPO / "ds_configs" / f"zero{stage}.json").read_text())
    config.update(train_micro_batch_size_per_gpu=micro_batch, train_batch_size=micro_batch * WORLD,
                  gradient_accumulation_steps=1, gradient_clipping=1.0, bf16={"enabled": True},
                  data_types={"grad_accum_dtype": "bf16"}, zero_allow_untested_optimizer=True,
                  steps_per_print=10**9)
    zero = config["zero_optimization"]
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if key in zero:
            zero[key] = buckets
    if "stage3_param_persistence_threshold" in zero:
        zero["stage3_param_persistence_threshold"] = 10 * hidden
    return config


def batch(size: int, image_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.zeros(size, 77, dtype=torch.long)
    input_ids[:, 0], input_ids[:, 1:10], input_ids[:, 10] = 49406, 1000, 49407
    return dict(pixel_values=torch.randn(size, 3, image_size, image_size, generator=generator).bfloat16(),
                input_ids=input_ids, attention_mask=(torch.arange(77) <= 10).long().expand(size, -1).contiguous(),
                labels=torch.zeros(size, len(TASKS), dtype=torch.long))


def measure(preset: str, stage: int, buckets: int, hidden: int, steps: int, calls: collections.Counter) -> dict:
    import deepspeed

    from cmaclip.config import OptimConfig
    from cmaclip.model import CMAClip, ModelConfig
    from cmaclip.train import build_optimizer

    torch.manual_seed(0)
    # the smallest image the preset takes: the parameters (what the buckets hold) are the preset's
    model = CMAClip(ModelConfig(preset=preset, dropout=0.0, image_size=32), TASKS)
    optimizer = build_optimizer(model, OptimConfig())
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, buckets, hidden, 2))
    inputs = batch(2, 32)
    per_step = []
    for _ in range(steps):
        before = calls.copy()
        engine.backward(engine(**inputs).loss)
        engine.step()
        per_step.append(calls - before)
    counted = sum(per_step[1:], collections.Counter())
    return {"numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters()),
            "communication": str(engine.communication_data_type).removeprefix("torch."),
            "per_step": {name: value / (steps - 1) for name, value in counted.items()}}


def worker(rank: int, port: int, preset: str, steps: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    calls = count_collectives()  # before DeepSpeed keeps references to the collectives
    import deepspeed

    from cmaclip.distributed import BUCKET_ELEMENTS, quiet_libraries, skip_deepspeed_shm_op

    quiet_libraries()
    skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    from cmaclip.model.config import ModelConfig, preset_clip_config

    clip = preset_clip_config(ModelConfig(preset=preset))
    hidden = max(clip.text_config.hidden_size, clip.vision_config.hidden_size)  # the trainer's hidden_size
    measured = {}
    for stage in (2, 3):
        for rule, buckets in (("hidden²", hidden * hidden), ("BUCKET_ELEMENTS", BUCKET_ELEMENTS)):
            measured[(stage, rule)] = {**measure(preset, stage, buckets, hidden, steps, calls), "buckets": buckets}
    if rank == 0:
        results.update(measured)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="vit-b-16")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, args.preset, args.steps, results), nprocs=WORLD, join=True)

    any_result = next(iter(results.values()))
    print(f"preset {args.preset}: {any_result['numel'] / 1e6:.1f}M parameters, world size {WORLD}, bf16, "
          f"{any_result['communication']} communication; collective calls per step (rank 0, mean of steps "
          f"2-{args.steps})")
    totals = {}
    for (stage, rule), result in sorted(results.items()):
        calls = result["per_step"]
        totals[(stage, rule)] = sum(calls.values())
        detail = ", ".join(f"{name} {value:g}" for name, value in sorted(calls.items()))
        print(f"ZeRO-{stage} buckets {result['buckets']:>10,} ({rule}): {totals[(stage, rule)]:g} calls ({detail})")
    for stage in (2, 3):
        print(f"zero{stage} calls per step, hidden² / BUCKET_ELEMENTS: "
              f"{totals[(stage, 'hidden²')] / totals[(stage, 'BUCKET_ELEMENTS')]:.1f}")
    print(f"collectives: {totals[(2, 'hidden²')] / totals[(2, 'BUCKET_ELEMENTS')]:.1f}")


if __name__ == "__main__":
    main()
