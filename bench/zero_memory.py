"""Per-rank model-state memory of DDP and DeepSpeed ZeRO-1/2/3 at world size 2, measured from the
tensors each rank really holds, against the ZeRO paper's formula (Rajbhandari et al. 2020, Fig. 1).

Two CPU processes (gloo) train the tiny CMA-CLIP one step with AdamW in each mode. Per rank:
  parameters  the model's parameter storage (ZeRO-3: each parameter's partition, ds_tensor)
  gradients   what holds the gradients between backward and the optimizer step: p.grad, and
              DeepSpeed's reduced gradient partitions. DeepSpeed's ZeRO-1 also reduces the
              gradients into partitions at the end of backward (the paper's P_os keeps them whole),
              so it measures like ZeRO-2 here; inside gradient accumulation it keeps full p.grad.
  optimizer   AdamW's exp_avg + exp_avg_sq, plus DeepSpeed's fp32 master copy of its partition
The formula, for Ψ parameters on N ranks with P bytes per parameter/gradient element and K bytes of
optimizer state per parameter: DDP (P+P+K)Ψ, ZeRO-1 PΨ+PΨ+KΨ/N, ZeRO-2 PΨ+(P+K)Ψ/N,
ZeRO-3 (P+P+K)Ψ/N. The paper's mixed precision has P=2, K=12; this CPU run is fp32: P=4, and
K=8 for DDP's torch AdamW (m, v) but 12 under DeepSpeed (m, v and the fp32 master copy, which
DeepSpeed keeps even for fp32 models). Partitions are padded for alignment, so measured values
can exceed the formula by a few bytes per rank. Buckets and communication buffers are not model
state and are not counted.

    .venv/bin/python bench/zero_memory.py [--preset tiny]
"""
from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
TASKS = {"category": [f"c{i}" for i in range(20)], "colour": [f"k{i}" for i in range(30)]}
MODES = ("ddp", "zero1", "zero2", "zero3")


def nbytes(tensors) -> int:
    """Bytes of `tensors`, each counted once (DeepSpeed hands out partitions and gradients as views
    into flat buffers: a view counts its own elements, not the whole buffer it lives in)."""
    seen = {}
    for tensor in tensors:
        if tensor is not None:
            seen[(tensor.data_ptr(), tensor.numel())] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def batch(image_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.zeros(4, 77, dtype=torch.long)
    input_ids[:, 0], input_ids[:, 1:10], input_ids[:, 10] = 49406, 1000, 49407
    return dict(pixel_values=torch.randn(4, 3, image_size, image_size, generator=generator), input_ids=input_ids,
                attention_mask=(torch.arange(77) <= 10).long().expand(4, -1).contiguous(),
                labels=torch.zeros(4, len(TASKS), dtype=torch.long))


def build(preset: str):
    from cmaclip.config import OptimConfig
    from cmaclip.model import CMAClip, ModelConfig
    from cmaclip.train import build_optimizer

    torch.manual_seed(0)
    model = CMAClip(ModelConfig(preset=preset, dropout=0.0), TASKS)
    return model, build_optimizer(model, OptimConfig())


def adam_states(optimizer) -> list[torch.Tensor]:
    return [value for state in optimizer.state.values() for key, value in state.items() if key != "step"]


def measure_ddp(preset: str) -> dict:
    model, optimizer = build(preset)
    wrapped = torch.nn.parallel.DistributedDataParallel(model)
    wrapped(**batch(model.config.image_size)).loss.backward()
    gradients = nbytes(p.grad for p in model.parameters())
    optimizer.step()
    return {"parameters": nbytes(model.parameters()), "gradients": gradients,
            "optimizer": nbytes(adam_states(optimizer)), "numel": sum(p.numel() for p in model.parameters())}


def measure_zero(preset: str, stage: int) -> dict:
    import deepspeed

    model, optimizer = build(preset)
    numel = sum(p.numel() for p in model.parameters())
    hidden = model.backbone.clip_config.vision_config.hidden_size
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "zero_optimization": {"stage": stage, "reduce_bucket_size": hidden * hidden,
                                    # every parameter partitioned, so the bytes show the pure scheme
                                    "stage3_param_persistence_threshold": 0}}
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.backward(engine(**batch(model.config.image_size)).loss)
    # between backward and the step: the model's p.grad and DeepSpeed's gradient partitions
    held = [p.grad for p in engine.module.parameters()]
    for group in zero_optimizer.averaged_gradients.values() if stage < 3 else ():
        held += list(group) if isinstance(group, (list, tuple)) else [getattr(group, "flat_partition", None)]
    held += [getattr(zero_optimizer, "grads_in_partition", None),
             getattr(zero_optimizer, "grad_partitions_flat_buffer", None)]
    gradients = nbytes(held)
    engine.step()
    if stage == 3:
        parameters = nbytes(p.ds_tensor for p in engine.module.parameters())
        master = zero_optimizer.fp32_partitioned_groups_flat
    else:
        parameters = nbytes(engine.module.parameters())
        master = zero_optimizer.single_partition_of_fp32_groups
    return {"parameters": parameters, "gradients": gradients,
            "optimizer": nbytes(adam_states(zero_optimizer.optimizer)) + nbytes(master), "numel": numel}


def formula(mode: str, numel: int) -> dict:
    parameter_bytes = gradient_bytes = 4
    state_bytes = 8 if mode == "ddp" else 12
    shards = {"ddp": (1, 1, 1), "zero1": (1, 1, WORLD), "zero2": (1, WORLD, WORLD), "zero3": (WORLD, WORLD, WORLD)}[mode]
    return {"parameters": parameter_bytes * numel / shards[0], "gradients": gradient_bytes * numel / shards[1],
            "optimizer": state_bytes * numel / shards[2]}


def worker(rank: int, port: int, preset: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu")
    torch.set_num_threads(1)
    import deepspeed

    from cmaclip.distributed import quiet_libraries, skip_deepspeed_shm_op

    quiet_libraries()
    skip_deepspeed_shm_op()
    deepspeed.init_distributed(dist_backend="gloo")
    measured = {"ddp": measure_ddp(preset)}
    for stage in (1, 2, 3):
        measured[f"zero{stage}"] = measure_zero(preset, stage)
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, measured)
    if rank == 0:
        results.update(enumerate(gathered))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(worker, args=(port, args.preset, results), nprocs=WORLD, join=True)

    mib = 2 ** 20
    numel = results[0]["ddp"]["numel"]
    print(f"preset {args.preset}: {numel / 1e6:.2f}M parameters, world size {WORLD}, fp32; MiB per rank "
          f"(rank 0 / rank 1), formula in brackets")
    print(f"{'mode':<6} {'parameters':>22} {'gradients':>22} {'optimizer':>22} {'total':>22}")
    totals = {}
    for mode in MODES:
        expected = formula(mode, numel)
        cells = []
        for kind in ("parameters", "gradients", "optimizer", "total"):
            values = [results[r][mode][kind] if kind != "total" else sum(results[r][mode][k] for k in expected)
                      for r in range(WORLD)]
            target = sum(expected.values()) if kind == "total" else expected[kind]
            cells.append(f"{values[0] / mib:.1f}/{values[1] / mib:.1f} [{target / mib:.1f}]")
        totals[mode] = sum(results[0][mode][k] for k in ("parameters", "gradients", "optimizer"))
        print(f"{mode:<6} " + " ".join(f"{cell:>22}" for cell in cells))
    print(f"formula zero3/ddp: {sum(formula('zero3', numel).values()) / sum(formula('ddp', numel).values()):.3f} "
          f"(mixed precision, P=2 K=12: 16Ψ -> {16 / WORLD:.0f}Ψ = {1 / WORLD:.3f})")
    print(f"zero3 state bytes per rank / ddp: {totals['zero3'] / totals['ddp']:.3f}")


if __name__ == "__main__":
    main()
