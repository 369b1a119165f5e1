"""build_loader(): a loader over one split of a shards folder, on the backend `data.loader` picks
(dali.py or pil.py; the batch contract both keep is batch.py's)."""
from __future__ import annotations

from pathlib import Path

from .batch import BatchLoader
from .config import DataConfig
from .format import load_dataset_info
from .integrity import check_split_files


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "dali" if dali_available() else "pil"
    if name == "dali" and not dali_available():
        raise ImportError("data.loader=dali but nvidia.dali does not import: install "
                          "the DALI build for your driver (README, GPU clusters) or set data.loader=pil")
    if name not in ("dali", "pil"):
        raise ValueError(f"data.loader: {name!r} is not one of auto, dali, pil")
    return name


def backend_reason(name: str) -> str:
    """Why data.loader=`name` runs the backend it does, for the run's first lines."""
    if name != "auto":
        return f"data.loader={name}"
    if dali_available():
        return "data.loader=auto, DALI installed"
    return "data.loader=auto, DALI not installed: see the README's GPU section"


def build_loader(shards_dir: str | Path, split: str, *, config: DataConfig, batch_size: int,
                 image_size: int, train: bool, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device="cpu") -> BatchLoader:
    """A loader over one split of a shards folder for one rank (batch.py: the batches it yields)."""
    dataset = load_dataset_info(shards_dir)
    check_split_files(dataset, split)
    arguments = dict(config=config, batch_size=batch_size, image_size=image_size, train=train,
                     rank=rank, world_size=world_size, seed=seed, device=device)
    if resolve_backend(config.loader) == "dali":
        from .dali import DaliLoader
        return DaliLoader(dataset, split, **arguments)
    from .pil import PilLoader
    return PilLoader(dataset, split, **arguments)
