"""Contrastive pretraining step time on 2 ranks vs 1 rank at the same per-rank batch: what the
feature gather (and DDP's gradient all-reduce) cost, the scaling of `cmaclip pretrain`.

One step = forward of both towers + all-gather of the features (with gradients) + CLIP loss over
the global batch + backward + DDP all-reduce + AdamW, on random image-title pairs, tiny preset,
one thread per rank, gloo on CPU (NCCL on CUDA with 2 GPUs). The world sizes alternate
(1, 2, 1, 2, ...) and each run reports its median step time; the headline (last line) is
median 2-rank / median 1-rank step time: 1.0 is perfect weak scaling (twice the pairs and
negatives per step for free); on 2 shared CPU cores both ranks also compete for the cores.

    .venv/bin/python bench/pretrain.py [--preset tiny] [--batch 16] [--steps 12] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cmaclip.distributed import free_port

SOT, EOT = 49406, 49407


def pairs(batch: int, image_size: int, generator: torch.Generator) -> dict:
    lengths = torch.randint(8, 31, (batch,), generator=generator)
    input_ids = torch.randint(1000, 40000, (batch, 77), generator=generator)
    input_ids[:, 0] = SOT
    input_ids[torch.arange(batch), lengths - 1] = EOT
    attention_mask = (torch.arange(77) < lengths[:, None]).long()
    return dict(pixel_values=torch.randn(batch, 3, image_size, image_size, generator=generator),
                input_ids=input_ids, attention_mask=attention_mask)


def worker(rank: int, world: int, port: int, args, result: str) -> None:
    from cmaclip.config import OptimConfig
    from cmaclip.distributed import gather_with_grad
    from cmaclip.model.config import ContrastiveConfig, ModelConfig
    from cmaclip.model.contrastive import ContrastiveCLIP
    from cmaclip.train import build_optimizer

    torch.set_num_threads(1)
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                                rank=rank, world_size=world)
    torch.manual_seed(0)
    model = ContrastiveCLIP(ModelConfig(preset=args.preset), ContrastiveConfig()).to(device)
    optimizer = build_optimizer(model, OptimConfig())
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    batch = {k: v.to(device) for k, v in pairs(args.batch, 64 if args.preset == "tiny" else 224,
                                                 torch.Generator().manual_seed(rank)).items()}
    times = []
    for _ in range(args.warmup + args.steps):
        started = time.perf_counter()
        loss = model(**batch, gather=gather_with_grad).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if rank == 0:
        torch.save(statistics.median(times[args.warmup:]), result)
    if world > 1:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16, help="pairs per rank")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    medians = {1: [], 2: []}
    print(f"preset {args.preset}, {args.batch} pairs per rank, median of {args.steps} steps per run")
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for world in (1, 2):
                result = os.path.join(folder, f"{world}-{repeat}.pt")
                mp.spawn(worker, args=(world, free_port(), args, result), nprocs=world)
                medians[world].append(torch.load(result))
                print(f"{world} rank(s), global batch {world * args.batch}: {medians[world][-1] * 1e3:.1f} ms/step",
                      flush=True)
    ratio = statistics.median(medians[2]) / statistics.median(medians[1])
    print(f"step time 2 ranks / 1 rank at {args.batch} pairs per rank: {ratio:.2f}")


if __name__ == "__main__":
    main()
