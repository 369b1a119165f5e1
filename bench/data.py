"""Input pipeline throughput: DALI vs the PIL fallback on the same shards.

Shards: 1000 samples made from the repository's 224 px product photos (cycled) by `write_shards`.
Setting: training batches (random resized crop to 224 + flip + normalize), batch 64, one rank,
2 DALI threads vs 2 DataLoader workers. Each run is one epoch; runs alternate DALI / PIL after a
warm-up epoch each; the table shows medians. CPU time is the process's (all threads) plus its
reaped children's (the DataLoader workers), so images per CPU-second is fair on a shared machine.

    .venv/bin/python bench/data.py [--runs 5] [--samples 1000] [--batch-size 64]
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmaclip.data.config import DataConfig  # noqa: E402
from cmaclip.data.loader import build_loader  # noqa: E402
from cmaclip.data.shards import write_shards  # noqa: E402

PHOTOS = REPO / "shards" / "fashion-products" / "images"


def make_shards(folder: Path, samples: int) -> Path:
    photos = sorted(PHOTOS.glob("*.jpg"))
    rows = [{"id": f"p{n}", "image": str(photos[n % len(photos)]), "text": f"product {n}",
             "labels": {"kind": f"k{n % 5}"}, "split": "train"} for n in range(samples)]
    (folder / "catalog.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    write_shards(folder / "catalog.jsonl", ["kind"], folder / "shards", workers=2, samples_per_shard=250)
    return folder / "shards"


def cpu_seconds() -> float:
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def run_epoch(loader) -> tuple[float, float, int]:
    """(wall seconds, CPU seconds, images) of one epoch, the loader's workers included."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    images = sum(len(batch["pixel_values"]) for batch in loader)
    return time.perf_counter() - wall, cpu_seconds() - cpu, images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        shards = make_shards(Path(folder), args.samples)
        loaders = {backend: build_loader(shards, "train", config=DataConfig(loader=backend, workers=args.workers),
                                         batch_size=args.batch_size, image_size=224, train=True)
                   for backend in ("dali", "pil")}
        for loader in loaders.values():
            run_epoch(loader)  # warm-up: pipeline build, page cache
        results = {backend: [] for backend in loaders}
        for _ in range(args.runs):
            for backend, loader in loaders.items():
                results[backend].append(run_epoch(loader))

    print(f"{args.samples} samples, 224 px photos -> random resized crop 224, batch {args.batch_size}, "
          f"{args.workers} threads/workers, median of {args.runs} interleaved epochs")
    print(f"{'loader':8} {'images/s':>10} {'images/CPU-s':>13} {'CPU-s/epoch':>12}")
    per_cpu = {}
    for backend, runs in results.items():
        speed = statistics.median(images / wall for wall, _, images in runs)
        per_cpu[backend] = statistics.median(images / cpu for _, cpu, images in runs)
        cpu = statistics.median(cpu for _, cpu, _ in runs)
        print(f"{backend:8} {speed:10.1f} {per_cpu[backend]:13.1f} {cpu:12.2f}")
    print(f"data speedup dali/pil per-cpu-second: {per_cpu['dali'] / per_cpu['pil']:.2f}")


if __name__ == "__main__":
    main()
