"""The fallback input pipeline: the webdataset tars read with PIL in a torch DataLoader.

Same batches as the DALI loader (batch.py's rule: DALI's split into parts, padding, steps).
Samples are located through the shards' .idx files (the ones DALI reads), so the sample order is
DALI's and a sample is one positioned read. The rank's share is explicit (batch.rank_share) and
so is the workers' share: one endless stream of batches over all epochs, batch g of it made by
worker g mod workers, the order the DataLoader collects them in (workers start once and keep
decoding across epoch ends). Every random choice (shuffle, crop, flip) is seeded by
(seed, rank, epoch[, position]), so a resumed loader needs no state beyond (epoch, batch), and the
number of workers does not change the batches. A sample that cannot be read becomes an empty
padding row (index -1) with a warning, rate-limited per worker process.
"""
from __future__ import annotations

import io
import logging
import math
import os
import time
from collections import OrderedDict

import numpy as np
import torch
from PIL import Image, ImageOps

from cmaclip.errors import DataError

from .format import INT32_COMPONENTS, SOT_TOKEN_ID, EOT_TOKEN_ID, decode_int32
from .batch import READ_COMPONENTS, BatchLoader, batches_per_epoch, normalize, rank_share

log = logging.getLogger(__name__)

MAX_OPEN_SHARDS = 64  # per process


# --- image transforms -------------------------------------------------------------------------

def eval_crop(image: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side to image_size (bicubic), centre crop: uint8 [S, S, 3]."""
    image = image.convert("RGB")
    width, height = image.size
    scale = image_size / min(width, height)
    # sizes rounded half up, as DALI's resize does
    width, height = max(image_size, int(width * scale + 0.5)), max(image_size, int(height * scale + 0.5))
    image = image.resize((width, height), Image.BICUBIC)
    # the centre window's corner rounded half up, as DALI's crop_pos_x/y=0.5 places it
    left, top = (width - image_size + 1) // 2, (height - image_size + 1) // 2
    return np.array(image.crop((left, top, left + image_size, top + image_size)))  # writable, for torch


def train_crop(image: Image.Image, image_size: int, min_scale: float, hflip: bool,
               rng: np.random.Generator) -> np.ndarray:
    """Random resized crop (area fraction min_scale..1, aspect 3/4..4/3) + optional flip."""
    image = image.convert("RGB")
    width, height = image.size
    box = (0, 0, width, height)  # the whole image when no sampled window fits (as torchvision)
    for _ in range(10):
        area = width * height * rng.uniform(min_scale, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_width, crop_height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            box = (left, top, left + crop_width, top + crop_height)
            break
    image = image.resize((image_size, image_size), Image.BILINEAR, box=box)
    if hflip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(image)  # writable, for torch


def preprocess_image(image: Image.Image, image_size: int) -> torch.Tensor:
    """The evaluation transform for one photo: float32 [3, S, S] (predict/explain use it). The
    photo is first turned upright by its EXIF orientation, as the shard writer does."""
    return normalize(torch.from_numpy(eval_crop(ImageOps.exif_transpose(image), image_size)).permute(2, 0, 1))


# --- reading samples --------------------------------------------------------------------------

class SampleTable:
    """Where each of `components` of each sample of a split lies: from the shards' .idx files."""

    def __init__(self, shard_paths: list[str], index_paths: list[str], components=READ_COMPONENTS):
        self.shard_paths, self.components = shard_paths, tuple(components)
        shard_of, offsets, sizes = [], [], []
        for shard_number, index_path in enumerate(index_paths):
            for line_number, components in _read_index(index_path):
                missing = [ext for ext in self.components if ext not in components]
                if missing:
                    raise DataError(f"{index_path} line {line_number}: sample lacks {missing}")
                shard_of.append(shard_number)
                offsets.append([components[ext][0] for ext in self.components])
                sizes.append([components[ext][1] for ext in self.components])
        self.shard_of = np.asarray(shard_of, dtype=np.int32)
        self.offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, len(self.components))
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, len(self.components))
        self._files: OrderedDict[int, int] = OrderedDict()  # shard number -> descriptor, LRU

    def __len__(self) -> int:
        return len(self.shard_of)

    def read(self, sample: int) -> dict[str, bytes]:
        """The sample's components (shorter than the index says if the tar is truncated)."""
        descriptor = self._descriptor(int(self.shard_of[sample]))
        return {ext: os.pread(descriptor, int(size), int(offset))
                for ext, offset, size in zip(self.components, self.offsets[sample], self.sizes[sample])}

    def _descriptor(self, shard: int) -> int:
        # pread needs no file position, so descriptors inherited by forked workers are safe; a
        # split can have thousands of shards, so only the most recently used ones stay open
        if shard in self._files:
            self._files.move_to_end(shard)
        else:
            if len(self._files) == MAX_OPEN_SHARDS:
                os.close(self._files.popitem(last=False)[1])
            self._files[shard] = os.open(self.shard_paths[shard], os.O_RDONLY)
        return self._files[shard]

    def location(self, sample: int) -> str:
        shard = int(self.shard_of[sample])
        first = int(np.searchsorted(self.shard_of, shard))
        return f"{self.shard_paths[shard]} sample {sample - first}"


def _read_index(index_path: str):
    """Yield (line number, {ext: (offset, size)}) per sample of a DALI webdataset index
    (v1.1: `ext offset size` per component, v1.2: `ext offset size filename`)."""
    with open(index_path) as file:
        header = file.readline().split()
        fields = {"v1.1": 3, "v1.2": 4}.get(header[0] if header else "")
        if fields is None:
            raise DataError(f"{index_path}: not a DALI webdataset index (header {header})")
        for line_number, line in enumerate(file, start=2):
            tokens = line.split()
            if len(tokens) % fields:
                raise DataError(f"{index_path} line {line_number}: malformed entry")
            yield line_number, {tokens[i]: (int(tokens[i + 1]), int(tokens[i + 2]))
                                for i in range(0, len(tokens), fields)}


class _WarningLimiter:
    """At most one warning every `interval` seconds, with a count of what was not reported."""

    def __init__(self, interval: float = 10.0):
        self.interval, self.last, self.unreported = interval, -math.inf, 0

    def warn(self, message: str):
        now = time.monotonic()
        if now - self.last < self.interval:
            self.unreported += 1
            return
        extra = f" ({self.unreported} more bad samples since the last warning)" if self.unreported else ""
        log.warning("%s%s", message, extra)
        self.last, self.unreported = now, 0


# --- making batches ---------------------------------------------------------------------------

class BatchMaker:
    """Makes batch b of epoch e for one rank: what the DataLoader workers run (no reference to
    the loader, so dropping the loader shuts its workers down at once)."""

    def __init__(self, loader: "PilLoader", table: SampleTable):
        self.table, self.config = table, loader.config
        self.num_samples = loader.num_samples
        self.batches_per_epoch = batches_per_epoch(loader.num_samples, loader.world_size, loader.batch_size)
        self.batch_size, self.image_size, self.train = loader.batch_size, loader.image_size, loader.train
        self.rank, self.world_size, self.seed = loader.rank, loader.world_size, loader.seed
        self.context_length, self.num_tasks = loader.dataset.context_length, len(loader.dataset.tasks)
        self._warnings = _WarningLimiter()

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Sample numbers the rank reads in this epoch, padded with the last one to whole batches."""
        part = rank_share(self.num_samples, self.rank, self.world_size, epoch)
        share = np.arange(part.start, part.stop)
        if self.train:
            share = np.random.default_rng([self.seed, self.rank, epoch]).permutation(share)
        padded = self.batches_per_epoch * self.batch_size
        return np.concatenate([share, np.full(padded - len(share), share[-1])])

    def make_batch(self, epoch: int, batch: int, order: np.ndarray) -> dict:
        images = torch.empty((self.batch_size, 3, self.image_size, self.image_size))
        tokens = np.empty((self.batch_size, self.context_length), np.int32)
        labels = np.empty((self.batch_size, self.num_tasks), np.int32)
        index = np.empty(self.batch_size, np.int64)
        modalities = np.empty((self.batch_size, 2), np.int32)
        for row in range(self.batch_size):
            position = batch * self.batch_size + row
            pixels, tokens[row], labels[row], index[row], modalities[row] = \
                self._read_row(epoch, position, int(order[position]))
            normalize(torch.from_numpy(pixels).permute(2, 0, 1), out=images[row])
        return {"pixel_values": images, "input_ids": torch.from_numpy(tokens),
                "labels": torch.from_numpy(labels), "index": torch.from_numpy(index),
                "modality_mask": torch.from_numpy(modalities)}

    def _read_row(self, epoch: int, position: int, sample: int):
        data = self.table.read(sample)  # a missing or unreadable shard file is an error, not a skip
        try:
            values = {ext: decode_int32(data[ext]) for ext in INT32_COMPONENTS}
            for ext, length in (("tok", self.context_length), ("lbl", self.num_tasks), ("idx", 1), ("mod", 2)):
                if len(values[ext]) != length:
                    raise ValueError(f"component {ext} has {len(values[ext])} values, expected {length}")
            image = Image.open(io.BytesIO(data["jpg"]))
            if self.train:
                rng = np.random.default_rng([self.seed, self.rank, epoch, position])
                pixels = train_crop(image, self.image_size, self.config.crop_min_scale,
                                    self.config.hflip, rng)
            else:
                pixels = eval_crop(image, self.image_size)
            return pixels, values["tok"], values["lbl"], values["idx"][0], values["mod"]
        except Exception as error:  # noqa: BLE001 -- any unreadable sample is skipped, never fatal
            self._warnings.warn(f"skipping unreadable sample ({self.table.location(sample)}): {error}")
            return self._empty_row()

    def _empty_row(self):
        tokens = np.zeros(self.context_length, np.int32)
        tokens[:2] = SOT_TOKEN_ID, EOT_TOKEN_ID
        return (np.zeros((self.image_size, self.image_size, 3), np.uint8), tokens,
                np.full(self.num_tasks, -1, np.int32), -1, np.zeros(2, np.int32))


class BatchStream(torch.utils.data.IterableDataset):
    """The batches from (epoch, position) on, epoch after epoch, dealt to the DataLoader workers:
    batch g of the stream to worker g mod workers, the order the DataLoader collects them in.
    One stream serves all epochs, so workers start once and keep decoding across epoch ends."""

    def __init__(self, maker: BatchMaker, epoch: int, position: int):
        self.maker, self.epoch, self.position = maker, epoch, position

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker else (0, 1)
        maker, epoch, position, number = self.maker, self.epoch, self.position, 0
        while True:
            order = None
            for batch in range(position, maker.batches_per_epoch):
                if number % workers == worker_id:
                    order = maker.epoch_order(epoch) if order is None else order
                    yield maker.make_batch(epoch, batch, order)
                number += 1
            epoch, position = epoch + 1, 0


class PilLoader(BatchLoader):
    backend = "pil"

    def __init__(self, dataset, split, **arguments):
        super().__init__(dataset, split, **arguments)
        table = SampleTable(dataset.shard_paths(split), dataset.index_paths(split))
        if len(table) != self.num_samples:
            raise DataError(f"{dataset.root}: dataset.json says split {split!r} has "
                             f"{self.num_samples} samples, its .idx files list {len(table)}")
        self.maker = BatchMaker(self, table)
        self._stream = None  # the DataLoader iterator over a BatchStream
        self._stream_next = None  # the (epoch, batch) it yields next

    def _sample_maker(self):
        return self.maker

    def _raw_batches(self, epoch, position):
        start = (epoch, position) if position < len(self) else (epoch + 1, 0)
        if self._stream is None or self._stream_next != start:
            # its own generator: making the stream must not draw from torch's global RNG
            self._stream = iter(torch.utils.data.DataLoader(
                BatchStream(self.maker, *start), batch_size=None, num_workers=self.config.workers,
                pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(0)))
            self._stream_next = start
        for batch in range(position, len(self)):
            raw = next(self._stream)
            self._stream_next = (epoch, batch + 1) if batch + 1 < len(self) else (epoch + 1, 0)
            yield raw
