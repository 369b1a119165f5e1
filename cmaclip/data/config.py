"""DataConfig: the `data.*` keys (which shards, which input pipeline, which augmentation)."""
from __future__ import annotations

from dataclasses import dataclass

LOADERS = ("auto", "dali", "pil")


@dataclass
class DataConfig:
    shards: str = ""
    """Folder written by `cmaclip shards` (dataset.json + tar shards + their .idx files)."""

    loader: str = "auto"
    """Input pipeline: "dali" (DALI; nvJPEG decoding on a GPU), "pil" (the shards read with PIL in a
    torch DataLoader), or "auto" (DALI when it imports, else PIL). Both give the same batches
    contract (ARCHITECTURE.md "Batch")."""

    workers: int = 2
    """DALI CPU threads (at least 1), or PIL DataLoader worker processes (0 = decode in the
    training process)."""

    shuffle_buffer: int = 1000
    """Training only: samples DALI's reader holds and draws from at random (its `initial_fill`).
    The PIL loader shuffles the rank's whole share of the split and does not need it."""

    crop_min_scale: float = 0.9
    """Training only: the random resized crop keeps between this fraction of the image area and
    all of it (aspect ratio 3/4..4/3), then resizes to the model's image size. CLIP fine-tuning
    recipes keep most of the product in view; lower it for stronger augmentation."""

    hflip: bool = True
    """Training only: flip images horizontally with probability 0.5."""

    train_split: str = "train"
    """Split of dataset.json the trainer reads."""

    eval_split: str = "val"
    """Split of dataset.json evaluated during training."""

    def __post_init__(self):
        if self.loader not in LOADERS:
            raise ValueError(f"data.loader: {self.loader!r} is not one of {', '.join(LOADERS)}")
        if self.workers < 0:
            raise ValueError(f"data.workers: {self.workers} must be >= 0")
        if self.shuffle_buffer < 1:
            raise ValueError(f"data.shuffle_buffer: {self.shuffle_buffer} must be >= 1")
        if not 0.0 < self.crop_min_scale <= 1.0:
            raise ValueError(f"data.crop_min_scale: {self.crop_min_scale} must be in (0, 1]")
