"""Training-step time of CMA-CLIP (`model.fusion=cma`) vs fine-tuned CLIP (`concat`), same backbone,
same batch: what the sequence-wise and modality-wise attention cost on top of CLIP; and what the
training-only passes cost: over each modality alone (`cma` vs `cma` with
model.unimodal_loss_weight=0) and over the noisy titles (`cma` vs model.noisy_title_loss_weight=0).

One step = forward + loss + backward + AdamW step (the trainer's parameter groups), single process
(DDP/ZeRO add the same communication to both). Batch 4 of product-like inputs: titles of 8..30
tokens, two tasks. Backbones: the tiny preset (where the fusion layers are a large part of the
model) and ViT-B/32 (the smallest real CLIP). fp32 on CPU, bf16 autocast on CUDA when present.
Runs are interleaved (cma, concat, cma, ...) and the median is reported; the headline (last line)
is the ViT-B/32 ratio.

    .venv/bin/python bench/step.py [--presets tiny,vit-b-32] [--batch 4] [--repeats 4]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from cmaclip.config import OptimConfig
from cmaclip.model import CMAClip, ModelConfig
from cmaclip.train import build_optimizer

TASKS = {"category": [f"c{i}" for i in range(20)], "colour": [f"k{i}" for i in range(30)]}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SOT, EOT = 49406, 49407


def make_batch(batch: int, image_size: int, generator: torch.Generator) -> dict:
    lengths = torch.randint(8, 31, (batch,), generator=generator)
    input_ids = torch.zeros(batch, 77, dtype=torch.long)
    attention_mask = torch.zeros(batch, 77, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        input_ids[row, 0] = SOT
        input_ids[row, 1:length - 1] = torch.randint(1000, 40000, (length - 2,), generator=generator)
        input_ids[row, length - 1] = EOT
        attention_mask[row, :length] = 1
    labels = torch.stack([torch.randint(0, len(classes), (batch,), generator=generator) for classes in TASKS.values()], 1)
    values = dict(pixel_values=torch.randn(batch, 3, image_size, image_size, generator=generator),
                  input_ids=input_ids, attention_mask=attention_mask,
                  modality_mask=torch.ones(batch, 2, dtype=torch.bool), labels=labels)
    return {key: value.to(DEVICE) for key, value in values.items()}


class Trainer:
    """One training step at a time on `shapes` batches used in turn (titles of different lengths);
    `compiled`: the model under torch.compile (bench/compile.py)."""

    def __init__(self, preset: str, fusion: str, batch: int, compiled: bool = False, shapes: int = 1,
                 **model_options):
        torch.manual_seed(0)
        model = CMAClip(ModelConfig(preset=preset, fusion=fusion, dropout=0.0, **model_options), TASKS).to(DEVICE).train()
        self.optimizer = build_optimizer(model, OptimConfig())
        self.model = torch.compile(model) if compiled else model
        generator = torch.Generator().manual_seed(1)
        self.batches = [make_batch(batch, model.config.image_size, generator) for _ in range(shapes)]
        self.taken = 0
        self.parameters = sum(p.numel() for p in model.parameters())

    def step(self) -> float:
        self.batch = self.batches[self.taken % len(self.batches)]
        self.taken += 1
        autocast = torch.autocast("cuda", torch.bfloat16) if DEVICE == "cuda" else contextlib.nullcontext()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast:
            loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


def interleaved(trainers: dict, warmup_steps: int, repeats: int) -> tuple[dict, dict]:
    """-> ({name: seconds of its warm-up steps}, {name: median step seconds}) of trainers stepped in
    turn (a, b, a, b, ...), so that a change in the machine's load hits them alike."""
    # warm-up: allocator, kernels, optimizer state (and compilation)
    warmup = {name: sum(trainer.step() for _ in range(warmup_steps)) for name, trainer in trainers.items()}
    times = {name: [] for name in trainers}
    for _ in range(repeats):
        for name, trainer in trainers.items():
            times[name].append(trainer.step())
    return warmup, {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,vit-b-32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()

    print(f"device {DEVICE}, batch {args.batch}, {args.repeats} interleaved repeats, median step time")
    print(f"{'backbone':<10} {'fusion':<12} {'parameters':>11} {'step ms':>9}")
    ratio = None
    for preset in args.presets.split(","):
        trainers = {"cma": Trainer(preset, "cma", args.batch), "concat": Trainer(preset, "concat", args.batch),
                    "cma-no-aux": Trainer(preset, "cma", args.batch, unimodal_loss_weight=0.0),
                    "cma-no-noisy": Trainer(preset, "cma", args.batch, noisy_title_loss_weight=0.0)}
        _, medians = interleaved(trainers, warmup_steps=1, repeats=args.repeats)
        for name, trainer in trainers.items():
            print(f"{preset:<10} {name:<12} {trainer.parameters / 1e6:>10.2f}M {medians[name] * 1e3:>9.1f}")
        ratio = medians["cma"] / medians["concat"]
        print(f"{preset:<10} cma/concat {ratio:.2f}, alone passes cma/cma-no-aux "
              f"{medians['cma'] / medians['cma-no-aux']:.2f}, noisy-title pass cma/cma-no-noisy "
              f"{medians['cma'] / medians['cma-no-noisy']:.2f}")
        del trainers
    print(f"step overhead cma/concat: {ratio:.2f}")


if __name__ == "__main__":
    main()
