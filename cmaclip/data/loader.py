"""build_loader(): the batch contract (ARCHITECTURE.md "Batch") and what both backends share.

How a split is cut into batches, identically on both backends (it is DALI's reader's rule, so the
PIL loader copies it): the N samples, in shard order, are cut into `world_size` contiguous parts
(part p = samples floor(p*N/W) .. floor((p+1)*N/W)); in epoch e rank r reads part (r + e) % W,
shuffled when training. Every part is padded to ceil(N/W) samples and then to whole batches by
repeating the part's last sample, so every rank takes ceil(ceil(N/W)/B) steps per epoch. Padding
rows are real samples (a training step on them is harmless, as with DistributedSampler) but
carry index -1, so evaluation counts every sample exactly once over all ranks.

A loader is resumable: `state_dict()` (per rank, small, JSON-able) holds the epoch, the batches
already taken from it, and for DALI the pipeline's checkpoint (reader position, shuffle buffer and
augmentation RNG); a loader given it yields exactly what the saved one would have yielded next.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from .config import DataConfig
from cmaclip.errors import DataError

from .format import EOT_TOKEN_ID, DatasetInfo, load_dataset_info
from .integrity import check_split_files

# CLIP's image normalization (the statistics its encoders were trained with).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# (x / 255 - mean) / std as x * _SCALE + _SHIFT
_SCALE = (1 / (255 * torch.tensor(CLIP_STD))).view(3, 1, 1)
_SHIFT = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)

# Components a loader reads from each sample (format.py documents them).
READ_COMPONENTS = ("jpg", "tok", "lbl", "idx", "mod")
# The batch keys CMAClip.forward takes; `labels` only when a loss is wanted, `index` never (it is
# the loader's bookkeeping for counting samples once).
MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask", "modality_mask")
# Facts about the batch counted on the host before it moves to the device, so that the model
# needs no device-to-host sync to learn them (it computes them itself when they are not given).
HOST_FACTS = ("text_length", "nothing_masked")


def model_inputs(batch: dict, with_labels: bool = False, with_host_facts: bool = False) -> dict:
    """with_host_facts: only for the batch as the loader made it (a perturbed copy has other facts)."""
    keys = MODEL_INPUTS + (("labels",) if with_labels else ())
    inputs = {key: batch[key] for key in keys}
    if with_host_facts:
        inputs.update(text_length=int(batch["text_length"]), nothing_masked=bool(batch["nothing_masked"]))
    return inputs


def normalize(image: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """One uint8 image [3, S, S] (any strides) -> float32 [3, S, S] with CLIP's mean/std, in one
    pass; called per image, so the image is still in cache (a whole batch at a time is 3x slower)."""
    return torch.addcmul(_SHIFT, image, _SCALE, out=out)


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def rank_share(num_samples: int, rank: int, world_size: int, epoch: int) -> range:
    """The samples (positions in shard order) rank `rank` reads in epoch `epoch`."""
    part = (rank + epoch) % world_size
    return range(part * num_samples // world_size, (part + 1) * num_samples // world_size)


def attention_mask(input_ids: torch.Tensor) -> torch.Tensor:
    """1 up to and including the first EOT (torch twin of format.attention_mask_from_tokens)."""
    is_eot = input_ids == EOT_TOKEN_ID
    first_eot = torch.where(is_eot.any(-1), is_eot.int().argmax(-1), input_ids.shape[-1] - 1)
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (positions <= first_eot[:, None]).long()


class BatchLoader:
    """Epoch bookkeeping, padding marks and resume state; a backend supplies `_raw_batches`."""

    backend = ""

    def __init__(self, dataset: DatasetInfo, split: str, *, config: DataConfig, batch_size: int,
                 image_size: int, train: bool, rank: int, world_size: int, seed: int, device):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1 or image_size < 1:
            raise ValueError(f"batch_size ({batch_size}) and image_size ({image_size}) must be >= 1")
        self.dataset, self.split, self.config = dataset, split, config
        self.num_samples = dataset.num_samples(split)
        if self.num_samples < world_size:  # DALI's reader refuses it, and a rank would read nothing
            raise DataError(f"{dataset.root}: split {split!r} has {self.num_samples} samples, "
                             f"fewer than the {world_size} ranks; every rank needs at least one")
        self.batch_size, self.image_size, self.train = batch_size, image_size, train
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.num_classes = torch.tensor([len(classes) for classes in dataset.tasks.values()])
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.world_size, self.batch_size)

    def __iter__(self):
        """The rest of the current epoch; afterwards the epoch counter advances."""
        real_samples = len(rank_share(self.num_samples, self.rank, self.world_size, self.epoch))
        for raw in self._raw_batches(self.epoch, self.position):
            batch = self._finish(raw, first_row=self.position * self.batch_size, real_samples=real_samples)
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def _raw_batches(self, epoch: int, position: int):
        """Yield the epoch's batches from `position` on: dicts with pixel_values, input_ids,
        labels, modality_mask, index (rows in the order of the epoch, index -1 for rows the
        backend could not read), on any device and in any integer dtype."""
        raise NotImplementedError

    def _finish(self, raw: dict, first_row: int, real_samples: int) -> dict:
        rows = torch.arange(first_row, first_row + self.batch_size)
        index = raw["index"].reshape(-1).long().cpu()
        index[rows >= real_samples] = -1
        if raw["labels"].device.type == "cpu":  # a check on the device would cost a host sync
            self._check_labels(raw["labels"].reshape(len(index), -1), index)
        input_ids = raw["input_ids"].cpu().long()
        mask, modality_mask = attention_mask(input_ids), raw["modality_mask"].cpu().bool()
        lengths = mask.sum(dim=1)
        text_length = lengths.max().clamp(min=1)
        return {
            "pixel_values": raw["pixel_values"].to(self.device, torch.float32, non_blocking=True),
            "input_ids": input_ids.to(self.device, non_blocking=True),
            "attention_mask": mask.to(self.device, non_blocking=True),
            "labels": raw["labels"].to(self.device, torch.long, non_blocking=True),
            "modality_mask": modality_mask.to(self.device, non_blocking=True),
            "index": index.to(self.device, non_blocking=True),
            "text_length": text_length,
            "nothing_masked": (lengths == text_length).all() & modality_mask.all(),
        }

    def _check_labels(self, labels: torch.Tensor, index: torch.Tensor) -> None:
        """A label outside its task's classes (shards and dataset.json that do not belong together)
        would be an index error deep in the loss: name the sample instead."""
        bad = (labels < -1) | (labels >= self.num_classes)
        if bad.any():
            row, task = (int(i) for i in bad.nonzero()[0])
            name = list(self.dataset.tasks)[task]
            raise DataError(f"{self.dataset.root}: split {self.split!r} sample {int(index[row])}: label "
                            f"{int(labels[row, task])} for task {name!r}, which has {int(self.num_classes[task])} "
                            f"classes in dataset.json (were the shards written with another dataset.json?)")

    # --- resume ---------------------------------------------------------------------------------

    def _identity(self) -> dict:
        """What a state must match to be meaningful for this loader."""
        return {"backend": self.backend, "split": self.split, "train": self.train, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "batch_size": self.batch_size,
                "samples": self.num_samples}

    def state_dict(self) -> dict:
        return {**self._identity(), "epoch": self.epoch, "position": self.position,
                **self._backend_state()}

    def load_state_dict(self, state: dict) -> None:
        mismatched = {key: (state.get(key), value) for key, value in self._identity().items()
                      if state.get(key) != value}
        if mismatched:
            details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items())
            raise DataError(f"cannot resume the {self.split} loader from this data state ({details}); "
                             "resume with the saved data settings and world size")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._load_backend_state(state)

    def _backend_state(self) -> dict:
        return {}

    def _load_backend_state(self, state: dict) -> None:
        pass


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
    """A loader over one split of a shards folder for one rank (see the module docstring)."""
    dataset = load_dataset_info(shards_dir)
    check_split_files(dataset, split)
    arguments = dict(config=config, batch_size=batch_size, image_size=image_size, train=train,
                     rank=rank, world_size=world_size, seed=seed, device=device)
    if resolve_backend(config.loader) == "dali":
        from .dali import DaliLoader
        return DaliLoader(dataset, split, **arguments)
    from .pil import PilLoader
    return PilLoader(dataset, split, **arguments)
