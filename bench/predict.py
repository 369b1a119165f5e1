"""Catalogue prediction throughput (`cmaclip predict --shards`): DALI vs the PIL fallback, and 2 ranks vs 1.

The shards are bench/data.py's 512 px set (mosaics of the repository's product photos; the writer
keeps them at its default max_side of 512 px). The model is a tiny CMA-CLIP with a 224 px input and
32 px patches, so the measurement is of what prediction adds around a model: decode, resize to
224 + centre crop, the forward, softmax/top-k and the Parquet rows (on a GPU the model's share
grows, and DALI decodes there with nvJPEG). Each run is a fresh process (or two, under `accelerate
launch` with launchers/accelerate/cpu.yaml) that times one rank's share from the loader's start to
its part written, after the model is loaded; runs alternate; the table shows medians. CPU time is
every rank's process (all its threads) plus its children (DataLoader workers), as bench/data.py
counts it, so images per CPU-second is fair on a shared machine; 2-rank images/s is the split's
images over the slower rank's time. Every rank is set up alike: one torch thread (more mostly spin
in OpenMP on ops this small) and one DALI thread or PIL DataLoader worker, so "2 ranks / 1 rank" is
the scaling of the same rank, as on more GPUs. On a machine shared with other work, compare the
per-CPU-second column; wall-clock ratios follow the load.

    .venv/bin/python bench/predict.py [--runs 3] [--samples 256] [--batch-size 32]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import cpu_seconds, make_shards  # noqa: E402  (bench/data.py: same shards, same CPU clock)

SETTINGS = {  # name: (loader, ranks)
    "dali 1 rank": ("dali", 1),
    "pil 1 rank": ("pil", 1),
    "dali 2 ranks": ("dali", 2),
}
WORKERS = 1  # per rank: DALI threads / PIL DataLoader workers


def bench_model(folder: Path, tasks: dict) -> Path:
    from cmaclip.checkpoint import MODEL_DIR
    from cmaclip.model import CMAClip, ModelConfig
    from cmaclip.model.config import preset_clip_config

    config = ModelConfig(preset="tiny", image_size=224)
    clip = preset_clip_config(config).to_dict()
    clip["vision_config"]["patch_size"] = 32  # 49 patches: the model stays small next to the loader
    CMAClip(config, tasks, clip_config=clip).save_pretrained(folder / MODEL_DIR)
    return folder / MODEL_DIR


def measure(loader_name: str, shards: str, model_dir: str, batch_size: int, workers: int) -> None:
    """One rank of a run: print {"rank", "images", "wall", "cpu"} as JSON."""
    from cmaclip.batch_predict import PartWriter, predict_share, product_ids
    from cmaclip.checkpoint import load_model
    from cmaclip.config import RunConfig
    from cmaclip.data.config import DataConfig
    from cmaclip.data.format import load_dataset_info
    from cmaclip.data.loader import build_loader
    from cmaclip.distributed import make_accelerator, quiet_libraries, shutdown

    quiet_libraries()
    accelerator = make_accelerator(RunConfig())
    model = load_model(model_dir, accelerator.device)
    info = load_dataset_info(shards)
    rank = accelerator.process_index
    accelerator.wait_for_everyone()
    wall, cpu = time.perf_counter(), cpu_seconds()
    loader = build_loader(shards, "train", config=DataConfig(loader=loader_name, workers=workers),
                          batch_size=batch_size, image_size=model.config.image_size, train=False, rank=rank,
                          world_size=accelerator.num_processes, device=accelerator.device)
    with tempfile.TemporaryDirectory() as out:
        part = PartWriter(Path(out) / "part.parquet")
        images, _ = predict_share(model, loader, product_ids(info, "train"), part, calibration=None, top_k=3,
                                  autocast=accelerator.autocast)
        part.close({})
    print(json.dumps({"rank": rank, "images": images, "wall": time.perf_counter() - wall, "cpu": cpu_seconds() - cpu}))
    del loader  # its workers go before the process group
    shutdown(accelerator)


def run(setting: str, shards: Path, model_dir: Path, batch_size: int) -> dict:
    loader, ranks = SETTINGS[setting]
    arguments = ["--measure", loader, str(shards), str(model_dir), "--batch-size", str(batch_size)]
    if ranks == 1:
        command = [sys.executable, __file__, *arguments]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(REPO / "launchers" / "accelerate" / "cpu.yaml"), "--num_processes", str(ranks),
                   "--main_process_port", str(29500 + os.getpid() % 1000), __file__, *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO, env=env).stdout
    per_rank = [json.loads(line) for line in output.splitlines() if line.startswith('{"rank"')]
    assert len(per_rank) == ranks, output
    return {"images": sum(r["images"] for r in per_rank), "wall": max(r["wall"] for r in per_rank),
            "cpu": sum(r["cpu"] for r in per_rank)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--measure", nargs=3, metavar=("LOADER", "SHARDS", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure, args.batch_size, WORKERS)
        return

    from cmaclip.data.format import load_dataset_info

    results = {setting: [] for setting in SETTINGS}
    with tempfile.TemporaryDirectory() as folder:
        shards = make_shards(Path(folder), args.samples, large=True)
        model_dir = bench_model(Path(folder), load_dataset_info(shards).tasks)
        for _ in range(args.runs):
            for setting in SETTINGS:
                results[setting].append(run(setting, shards, model_dir, args.batch_size))

    print(f"{args.samples} products (512 px JPEGs) -> predict at 224 px, batch {args.batch_size}, "
          f"median of {args.runs} interleaved runs")
    print(f"{'setting':14} {'images/s':>9} {'images/CPU-s':>13}")
    speed, per_cpu = {}, {}
    for setting, runs in results.items():
        speed[setting] = statistics.median(r["images"] / r["wall"] for r in runs)
        per_cpu[setting] = statistics.median(r["images"] / r["cpu"] for r in runs)
        print(f"{setting:14} {speed[setting]:9.1f} {per_cpu[setting]:13.1f}")
    print(f"2 ranks / 1 rank (DALI) images/s: {speed['dali 2 ranks'] / speed['dali 1 rank']:.2f}")
    print(f"dali/pil images/s: {speed['dali 1 rank'] / speed['pil 1 rank']:.2f}")
    print(f"predict speedup dali/pil per-cpu-second: {per_cpu['dali 1 rank'] / per_cpu['pil 1 rank']:.2f}")


if __name__ == "__main__":
    main()
