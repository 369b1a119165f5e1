"""End-to-end training throughput: `cmaclip train` vs the plain script a user would otherwise write.

Both train on the same 858 embedded fashion products (photos + titles, five label tasks), with the
same CLIP dimensions (the tiny preset), the same batch per process, the same number of processes
(2, gloo on the CPU), the same data workers per process and one torch thread per process:
  cmaclip  `accelerate launch -m cmaclip.train`, the `concat` variant (fine-tuned CLIP), the default
           loader (DALI when installed) on shards written by `cmaclip shards`;
  peer     transformers' CLIPModel (its documented forward) + one linear head per task on the two
           CLIP embeddings, a torch DataLoader over the CSV and the JPEG files (PIL decode, random
           resized crop and flip, CLIP normalization; titles tokenized in the collate function),
           DistributedSampler, workers and pinned memory, a plain DDP loop with AdamW.
Throughput is samples per second over all processes after a warm-up of `--warmup` steps (the
first logging window); the two sides run back to back `--repeats` times and the headline is the
median of the runs' ratios.

    .venv/bin/python bench/train_peer.py [--steps 60] [--batch 32] [--workers 1] [--repeats 1]
"""
from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cmaclip.distributed import free_port

REPO = Path(__file__).resolve().parent.parent
FASHION = REPO / "shards" / "fashion-products"
TASKS = ["masterCategory", "subCategory", "baseColour", "gender", "usage"]
TITLE = "productDisplayName"
PRESET = "tiny"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def environment() -> dict:
    # the same thread settings for both: one torch thread per process (two ranks share the cores)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run(command: list[str]) -> str:
    done = subprocess.run(command, cwd=REPO, env=environment(), capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"train_peer: {' '.join(command[:6])} ... failed (exit {done.returncode}):\n"
                 f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return done.stdout


# ---- cmaclip --------------------------------------------------------------------------------------

def cmaclip_throughput(shards: Path, out: Path, args) -> tuple[float, float]:
    """(samples/s of `cmaclip train` after the first logging window (the warm-up), the share of
    that time spent waiting for data)."""
    stdout = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                  str(REPO / "launchers" / "accelerate" / "cpu.yaml"), "--main_process_port", str(free_port()),
                  "-m", "cmaclip.train", "--config", "configs/cpu-demo.yaml", f"model.preset={PRESET}",
                  "model.fusion=concat", f"data.shards={shards}", f"data.workers={args.workers}",
                  "data.eval_split=none", f"train.max_steps={args.steps}", f"train.batch_size={args.batch}",
                  "train.save_every=0", "train.export=false", f"logging.log_every={args.warmup}",
                  "logging.tensorboard=false", "train.resume=", f"output_dir={out}"])
    # step lines (stdout is not a terminal): "step 20/60: loss ..., 123.4 samples/s, ..."
    windows = re.findall(r"^step \d+/\d+: .*?, ([\d.]+) samples/s, .*?waiting for data (\d+)%", stdout, re.M)
    if len(windows) < 2:
        sys.exit(f"train_peer: no throughput in cmaclip's output:\n{stdout[-2000:]}")
    rates, waits = [float(rate) for rate, _ in windows[1:]], [float(wait) / 100 for _, wait in windows[1:]]
    # equal samples per window: total / time is the harmonic mean, and time weighs the waits
    return statistics.harmonic_mean(rates), sum(w / r for w, r in zip(waits, rates)) / sum(1 / r for r in rates)


# ---- the peer: what a user writes with transformers + torch -------------------------------------

def read_products() -> tuple[list[dict], dict[str, list[str]]]:
    with open(FASHION / "metadata.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.DictReader(file))
    classes = {task: sorted({row[task] for row in rows if row[task]}) for task in TASKS}
    return rows, classes


def peer_worker(args) -> None:
    """One DDP rank of the plain script (started by torchrun)."""
    import numpy as np
    import torch
    import torch.distributed as dist
    from PIL import Image
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, Dataset, DistributedSampler
    from transformers import CLIPModel, CLIPTokenizer

    from cmaclip.data.tokenizer import converted_vocab_dir  # the CLIP vocabulary, offline
    from cmaclip.model.config import ModelConfig, preset_clip_config  # the same CLIP dimensions

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    rows, classes = read_products()
    clip_config = preset_clip_config(ModelConfig(preset=PRESET))
    image_size = clip_config.vision_config.image_size
    vocab = converted_vocab_dir()
    tokenizer = CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"))
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)

    class Products(Dataset):
        def __len__(self):
            return len(rows)

        def __getitem__(self, i):
            row = rows[i]
            image = Image.open(FASHION / row["image"]).convert("RGB")
            # RandomResizedCrop(scale=(0.9, 1)) + RandomHorizontalFlip, as torchvision does them
            width, height = image.size
            area = width * height * np.random.uniform(0.9, 1.0)
            aspect = np.exp(np.random.uniform(np.log(3 / 4), np.log(4 / 3)))
            crop_w = min(width, round((area * aspect) ** 0.5))
            crop_h = min(height, round((area / aspect) ** 0.5))
            left, top = np.random.randint(0, width - crop_w + 1), np.random.randint(0, height - crop_h + 1)
            image = image.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + crop_w, top + crop_h))
            if np.random.rand() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            pixels = (np.asarray(image, np.float32) / 255 - mean) / std
            labels = [classes[task].index(row[task]) if row[task] else -1 for task in TASKS]
            return torch.from_numpy(pixels.transpose(2, 0, 1).copy()), row[TITLE], torch.tensor(labels)

    def collate(samples):
        pixels, titles, labels = zip(*samples)
        text = tokenizer(list(titles), padding=True, truncation=True, max_length=77, return_tensors="pt")
        return torch.stack(pixels), text["input_ids"], text["attention_mask"], torch.stack(labels)

    class ClipClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = CLIPModel(clip_config)
            self.clip.logit_scale.requires_grad_(False)  # unused here; DDP fails on unused trainable parameters
            width = 2 * clip_config.projection_dim
            self.heads = nn.ModuleList(nn.Linear(width, len(classes[task])) for task in TASKS)

        def forward(self, pixel_values, input_ids, attention_mask):
            out = self.clip(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
            features = torch.cat([out.text_embeds, out.image_embeds], dim=-1)
            return [head(features) for head in self.heads]

    model = DistributedDataParallel(ClipClassifier())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    sampler = DistributedSampler(Products(), num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(Products(), batch_size=args.batch, sampler=sampler, num_workers=args.workers,
                        pin_memory=True, drop_last=True, collate_fn=collate, persistent_workers=args.workers > 0)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-1)

    def batches():
        epoch = 0
        while True:
            sampler.set_epoch(epoch)
            yield from loader
            epoch += 1

    model.train()
    stream = batches()
    waited = 0.0
    for step in range(args.steps):
        if step == args.warmup:
            dist.barrier()
            started, waited = time.perf_counter(), 0.0
        asked = time.perf_counter()
        pixel_values, input_ids, attention_mask, labels = next(stream)
        waited += time.perf_counter() - asked
        logits = model(pixel_values, input_ids, attention_mask)
        loss = sum(loss_fn(task_logits, labels[:, k]) for k, task_logits in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss.item()  # as a user logging the loss would (cmaclip reads it every step too)
    dist.barrier()
    if rank == 0:
        samples, seconds = (args.steps - args.warmup) * args.batch * world, time.perf_counter() - started
        print(f"peer samples/s: {samples / seconds:.2f}, waiting for data {waited / seconds:.3f}", flush=True)
    dist.destroy_process_group()


def peer_throughput(args) -> tuple[float, float]:
    stdout = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                  str(free_port()), __file__, "--peer-worker", f"--steps={args.steps}", f"--batch={args.batch}",
                  f"--workers={args.workers}", f"--warmup={args.warmup}"])
    found = re.search(r"^peer samples/s: ([\d.]+), waiting for data ([\d.]+)", stdout, re.M)
    if not found:
        sys.exit(f"train_peer: no throughput in the peer's output:\n{stdout[-2000:]}")
    return float(found.group(1)), float(found.group(2))


# ---- the comparison --------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps per run")
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out (cmaclip's first log window)")
    parser.add_argument("--batch", type=int, default=32, help="samples per process per step")
    parser.add_argument("--workers", type=int, default=1, help="data workers per process (DALI threads / DataLoader workers)")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs of each side")
    parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 2 * args.warmup:
        parser.error("--steps must be at least twice --warmup (a measured window after the warm-up)")
    if args.peer_worker:
        peer_worker(args)
        return

    from cmaclip.data.loader import resolve_backend
    from cmaclip.data.shards import write_shards

    with tempfile.TemporaryDirectory(prefix="train-peer-") as tmp:
        shards = Path(tmp) / "shards"
        write_shards(FASHION / "metadata.csv", TASKS, shards, image_root=FASHION, text_column=TITLE,
                     val_fraction=0.0, workers=2)
        print(f"{PRESET} CLIP dims, 2 processes x batch {args.batch}, {args.workers} data worker(s) and 1 torch "
              f"thread per process, {args.steps} steps ({args.warmup} warm-up); cmaclip loader: "
              f"{resolve_backend('auto')}")
        runs: dict[str, list[tuple[float, float]]] = {"cmaclip": [], "peer": []}
        for repeat in range(args.repeats):
            runs["cmaclip"].append(cmaclip_throughput(shards, Path(tmp) / f"run{repeat}", args))
            runs["peer"].append(peer_throughput(args))
            print(f"run {repeat + 1}: " + ", ".join(f"{side} {values[-1][0]:.1f} samples/s (waiting for data "
                                                    f"{values[-1][1]:.0%})" for side, values in runs.items()), flush=True)
    print(f"{'side':<8} {'samples/s':>10} {'waiting for data':>17}   (medians over the runs)")
    for side, values in runs.items():
        print(f"{side:<8} {statistics.median(r for r, _ in values):>10.1f} {statistics.median(w for _, w in values):>17.0%}")
    # each run's pair ran back to back: the median of the pairs' ratios is robust to the load drifting
    ratios = [cmaclip / peer for (cmaclip, _), (peer, _) in zip(runs["cmaclip"], runs["peer"])]
    print(f"train speedup cmaclip/peer samples-per-second: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
