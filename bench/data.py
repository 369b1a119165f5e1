"""Input pipeline throughput: DALI vs the PIL fallback on the same shards.

Two sets of shards, 1000 samples each, made by `write_shards` with its defaults:
  224 px  the repository's product photos as they are (cycled);
  512 px  larger photos, as retail catalogues have: 672 px mosaics of 3 x 3 of those photos
          (real photo detail at every scale), which the writer shrinks to its default
          max_side of 512 px. This is what users train on; its ratio is the headline.
Setting: training batches (random resized crop to 224 + flip + normalize), batch 64, one rank,
2 DALI threads vs 2 DataLoader workers. Each run is a fresh process (so one loader's prefetching
never runs on the other's clock) that reads a warm-up epoch and then times one epoch; runs
alternate DALI / PIL; the table shows medians. CPU time is the process's (all its threads) plus
its children's (the DataLoader workers), so images per CPU-second is fair on a shared machine.

    .venv/bin/python bench/data.py [--runs 5] [--samples 1000] [--batch-size 64] [--workers 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cmaclip.data.config import DataConfig  # noqa: E402
from cmaclip.data.loader import build_loader  # noqa: E402
from cmaclip.data.shards import write_shards  # noqa: E402

PHOTOS = REPO / "shards" / "fashion-products" / "images"
BACKENDS = ("dali", "pil")
MOSAIC_TILES = 3  # per side


def mosaic(photos: list[Path], number: int, folder: Path) -> Path:
    """Photo `number` of the large set: 3 x 3 of the sample photos (224 px each) in one JPEG."""
    tiles = [Image.open(photos[(number * MOSAIC_TILES**2 + tile) % len(photos)]).convert("RGB")
             for tile in range(MOSAIC_TILES**2)]
    side = tiles[0].width
    picture = Image.new("RGB", (MOSAIC_TILES * side, MOSAIC_TILES * side))
    for tile, image in enumerate(tiles):
        picture.paste(image.resize((side, side)), ((tile % MOSAIC_TILES) * side, (tile // MOSAIC_TILES) * side))
    path = folder / f"{number}.jpg"
    picture.save(path, quality=90)
    return path


def make_shards(folder: Path, samples: int, large: bool) -> Path:
    photos = sorted(PHOTOS.glob("*.jpg"))
    if large:
        (folder / "photos").mkdir()
        images = [mosaic(photos, n, folder / "photos") for n in range(samples)]
    else:
        images = [photos[n % len(photos)] for n in range(samples)]
    rows = [{"id": f"p{n}", "image": str(image), "text": f"product {n}",
             "labels": {"kind": f"k{n % 5}"}, "split": "train"} for n, image in enumerate(images)]
    (folder / "catalog.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    write_shards(folder / "catalog.jsonl", ["kind"], folder / "shards", workers=2, samples_per_shard=250)
    return folder / "shards"


def cpu_seconds() -> float:
    """This process (all its threads) + its live children (DataLoader workers) + reaped ones."""
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks, me = 0, str(os.getpid())
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if fields[1] == me:  # fields after the name: state, ppid, ..., utime (12th), stime (13th)
            ticks += int(fields[11]) + int(fields[12])
    return time.process_time() + reaped.ru_utime + reaped.ru_stime + ticks / os.sysconf("SC_CLK_TCK")


def measure(backend: str, shards: str, batch_size: int, workers: int) -> dict:
    """One run: a warm-up epoch (pipeline build, worker start, page cache), then one timed epoch."""
    loader = build_loader(shards, "train", config=DataConfig(loader=backend, workers=workers),
                          batch_size=batch_size, image_size=224, train=True)
    for _ in loader:
        pass
    wall, cpu = time.perf_counter(), cpu_seconds()
    images = sum(len(batch["pixel_values"]) for batch in loader)
    return {"wall": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu, "images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--measure", nargs=2, metavar=("BACKEND", "SHARDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure, args.batch_size, args.workers)))
        return

    sets = {"224 px": False, "512 px": True}
    results = {(name, backend): [] for name in sets for backend in BACKENDS}
    with tempfile.TemporaryDirectory() as folder:
        shards = {}
        for name, large in sets.items():
            (Path(folder) / name).mkdir()
            shards[name] = make_shards(Path(folder) / name, args.samples, large)
        for _ in range(args.runs):
            for name, backend in results:
                command = [sys.executable, __file__, "--measure", backend, str(shards[name]),
                           "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                results[name, backend].append(json.loads(output.strip().splitlines()[-1]))

    print(f"{args.samples} samples -> random resized crop 224, batch {args.batch_size}, "
          f"{args.workers} threads/workers, median of {args.runs} interleaved runs (one epoch each)")
    print(f"{'photos':8} {'loader':8} {'images/s':>10} {'images/CPU-s':>13} {'CPU-s/epoch':>12} {'dali/pil':>9}")
    per_cpu = {}
    for (name, backend), runs in results.items():
        speed = statistics.median(run["images"] / run["wall"] for run in runs)
        per_cpu[name, backend] = statistics.median(run["images"] / run["cpu"] for run in runs)
        cpu = statistics.median(run["cpu"] for run in runs)
        ratio = f"{per_cpu[name, 'dali'] / per_cpu[name, 'pil']:8.2f}x" if backend == "pil" else ""
        print(f"{name:8} {backend:8} {speed:10.1f} {per_cpu[name, backend]:13.1f} {cpu:12.2f} {ratio:>9}")
    print(f"data speedup dali/pil per-cpu-second: {per_cpu['512 px', 'dali'] / per_cpu['512 px', 'pil']:.2f}")


if __name__ == "__main__":
    main()
