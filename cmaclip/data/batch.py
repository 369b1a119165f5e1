"""The batch contract (ARCHITECTURE.md "Batch") and what both loader backends (dali.py, pil.py) share:
BatchLoader, CLIP's normalization, the components read, the rank's share of a split.

How a split is cut into batches, identically on both backends (it is DALI's reader's rule, so the
PIL loader copies it): the N samples, in shard order, are cut into `world_size` contiguous parts
(part p = samples floor(p*N/W) .. floor((p+1)*N/W)); in epoch e rank r reads part (r + e) % W,
shuffled when training. Every part is padded to ceil(N/W) samples and then to whole batches by
repeating the part's last sample, so every rank takes ceil(ceil(N/W)/B) steps per epoch. Padding
rows are real samples (a training step on them is harmless, as with DistributedSampler) but
carry index -1, so evaluation counts every sample exactly once over all ranks.

A loader is resumable: `state_dict()` (per rank, small, JSON-able) holds the epoch, the batches
already taken from it, the samples they held (`consumed`), and for DALI the pipeline's checkpoint
(reader position, shuffle buffer and augmentation RNG); a loader given it yields exactly what the
saved one would have yielded next.

Elastic resume (another world size): `load_elastic_state` takes every saved rank's state, and the
samples of the interrupted epoch that no rank consumed are cut into the new `world_size`
contiguous parts (sorted, shuffled within the part when training), padded as above; rank r reads
part r, decoded by the PIL path (`_sample_maker`: DALI's reader cannot start on an arbitrary subset),
so the epoch still covers every sample exactly once. Later epochs follow the rule above.
"""
from __future__ import annotations

import base64
import math

import numpy as np
import torch

from cmaclip.errors import DataError

from .config import DataConfig
from .format import DatasetInfo, attention_mask_from_tokens

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
    pass; called per image, so the image is still in cache (a whole batch at a time is slower:
    docs/MEASUREMENTS.md)."""
    return torch.addcmul(_SHIFT, image, _SCALE, out=out)


def batches_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    return math.ceil(math.ceil(num_samples / world_size) / batch_size)


def rank_share(num_samples: int, rank: int, world_size: int, epoch: int) -> range:
    """The samples (positions in shard order) rank `rank` reads in epoch `epoch`."""
    part = (rank + epoch) % world_size
    return range(part * num_samples // world_size, (part + 1) * num_samples // world_size)


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
        self.consumed = []  # index arrays of the samples the current epoch has yielded so far
        # After an elastic resume, until the epoch ends: (this rank's samples, batches per rank)
        self.remainder: tuple[np.ndarray, int] | None = None

    def __len__(self) -> int:
        if self.remainder is not None:
            return self.remainder[1]
        return batches_per_epoch(self.num_samples, self.world_size, self.batch_size)

    def __iter__(self):
        """The rest of the current epoch; afterwards the epoch counter advances."""
        if self.remainder is not None:
            real_samples, raw_batches = len(self.remainder[0]), self._remainder_batches(self.position)
        else:
            real_samples = len(rank_share(self.num_samples, self.rank, self.world_size, self.epoch))
            raw_batches = self._raw_batches(self.epoch, self.position)
        for raw in raw_batches:
            index = self._mark_padding(raw, first_row=self.position * self.batch_size, real_samples=real_samples)
            self.consumed.append(index[index >= 0].numpy().astype(np.int32))
            batch = self._finish(raw, index)
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0
        self.consumed, self.remainder = [], None

    def _raw_batches(self, epoch: int, position: int):
        """Yield the epoch's batches from `position` on: dicts with pixel_values, input_ids,
        labels, modality_mask, index (rows in the order of the epoch, index -1 for rows the
        backend could not read), on any device and in any integer dtype."""
        raise NotImplementedError

    def _remainder_batches(self, position: int):
        """An elastic resume's rest of the epoch (see the module docstring), one batch at a time."""
        samples, batches = self.remainder
        fill = samples[-1] if len(samples) else 0  # a rank with no sample left still takes its steps
        order = np.concatenate([samples, np.full(batches * self.batch_size - len(samples), fill)])
        maker = self._sample_maker()
        for batch in range(position, batches):
            yield maker.make_batch(self.epoch, batch, order)

    def _sample_maker(self):
        """A pil.BatchMaker over this split: it reads any sample by its number."""
        raise NotImplementedError

    def _mark_padding(self, raw: dict, first_row: int, real_samples: int) -> torch.Tensor:
        """The batch's sample indices on the host, -1 for the padding rows."""
        rows = torch.arange(first_row, first_row + self.batch_size)
        index = raw["index"].reshape(-1).long().cpu()
        index[rows >= real_samples] = -1
        return index

    def _finish(self, raw: dict, index: torch.Tensor) -> dict:
        if raw["labels"].device.type == "cpu":  # a check on the device would cost a host sync
            self._check_labels(raw["labels"].reshape(len(index), -1), index)
        input_ids = raw["input_ids"].cpu().long()
        mask = torch.from_numpy(attention_mask_from_tokens(input_ids.numpy()))
        modality_mask = raw["modality_mask"].cpu().bool()
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
        remainder = None if self.remainder is None else [encode(self.remainder[0]), self.remainder[1]]
        return {**self._identity(), "epoch": self.epoch, "position": self.position,
                "consumed": encode(np.concatenate([np.zeros(0, np.int32), *self.consumed])),
                "remainder": remainder, **self._backend_state()}

    def load_state_dict(self, state: dict) -> None:
        self._check_identity(state, ignore=())
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.consumed = [decode(state["consumed"])] if "consumed" in state else []
        remainder = state.get("remainder")
        self.remainder = None if remainder is None else (decode(remainder[0]), int(remainder[1]))
        self._load_backend_state(state)

    def load_elastic_state(self, states: list[dict]) -> None:
        """Continue the epoch that `states` (every rank's state_dict, saved with another world
        size) were in, on this world size: see the module docstring."""
        for state in states:
            self._check_identity(state, ignore=("backend", "rank", "world_size"))
        positions = {(int(state["epoch"]), int(state["position"])) for state in states}
        if len(positions) != 1 or any("consumed" not in state for state in states):
            raise DataError(f"cannot resume the {self.split} loader on {self.world_size} processes: the "
                             f"saved ranks' data states are not in step or predate elastic resume; resume "
                             f"with the {len(states)} processes that saved them")
        (epoch, position), = positions
        # rank 0 carries what the whole epoch consumed so far (unmerged, so a repeat stays visible)
        consumed = np.concatenate([decode(state["consumed"]) for state in states])
        remaining = np.setdiff1d(np.arange(self.num_samples), consumed)
        self.epoch, self.position, self.remainder = epoch, 0, None
        self.consumed = [consumed] if self.rank == 0 else []
        if position == 0:  # nothing consumed yet: the epoch's normal rule for this world size
            return
        if len(remaining) == 0:  # the epoch was over: the next one starts normally
            self.epoch, self.consumed = epoch + 1, []
            return
        left = len(remaining)
        samples = remaining[self.rank * left // self.world_size:(self.rank + 1) * left // self.world_size]
        if self.train:
            samples = np.random.default_rng([self.seed, self.rank, epoch, self.world_size]).permutation(samples)
        self.remainder = samples, batches_per_epoch(left, self.world_size, self.batch_size)
        self._load_backend_state({})  # a backend's own position is meaningless on another world size

    def _check_identity(self, state: dict, ignore: tuple) -> None:
        mismatched = {key: (state.get(key), value) for key, value in self._identity().items()
                      if key not in ignore and state.get(key) != value}
        if mismatched:
            details = ", ".join(f"{key}: saved {saved!r}, now {now!r}" for key, (saved, now) in mismatched.items())
            raise DataError(f"cannot resume the {self.split} loader from this data state ({details}); "
                             "resume with the saved data settings and world size")

    def _backend_state(self) -> dict:
        return {}

    def _load_backend_state(self, state: dict) -> None:
        pass


def encode(samples: np.ndarray) -> str:
    """Sample numbers as compact JSON-able text (4 bytes each: millions fit a checkpoint)."""
    return base64.b64encode(samples.astype("<i4").tobytes()).decode()


def decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<i4").astype(np.int64)
