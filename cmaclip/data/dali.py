"""The DALI input pipeline: webdataset reader -> JPEG decode (nvJPEG on a GPU) -> crop -> normalize.

On a CUDA device the images are decoded with `device="mixed"` (nvJPEG) and land on that GPU, while
token ids, labels, indices and modalities stay on the host (the loader reads them there without a
device sync); otherwise DALI runs its CPU operators with `device_id=None`. One exception on CPU: the
training crops leave DALI as decoded, uint8 and of any size, and `finish_crops` resizes, flips and
normalizes them with torch, because DALI's CPU resampling costs several times torch's uint8
kernel (bench/data.py; docs/MEASUREMENTS.md). The crop windows and flips are still drawn by DALI,
so they stay in its checkpoint. The reader splits the split into `num_shards` parts and pads them
(`pad_last_batch`), which is the batching rule batch.py describes; its shuffle buffer draws anew
every epoch. The pipeline is checkpointed (`enable_checkpointing`), so its reader position and RNG
states go into `state_dict()`.
"""
from __future__ import annotations

import base64
import sys
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch.torch_utils import to_torch_tensor

from cmaclip.errors import DataError

from .batch import CLIP_MEAN, CLIP_STD, READ_COMPONENTS, BatchLoader, normalize

READER_NAME = "Reader"
OUTPUTS = ("input_ids", "labels", "index", "modality_mask")  # after the images (and flips)


@pipeline_def(enable_checkpointing=True)
def clip_pipeline(*, paths, index_paths, shard_id, num_shards, train, shuffle_buffer, image_size,
                  crop_min_scale, hflip, on_gpu, crops_out):
    jpg, tok, lbl, idx, mod = fn.readers.webdataset(
        paths=paths, index_paths=index_paths, ext=list(READ_COMPONENTS),
        dtypes=[types.UINT8, types.INT32, types.INT32, types.INT32, types.INT32],
        missing_component_behavior="error", shard_id=shard_id, num_shards=num_shards,
        random_shuffle=train, initial_fill=shuffle_buffer, pad_last_batch=True, name=READER_NAME)
    decode_device = "mixed" if on_gpu else "cpu"
    normalize = dict(dtype=types.FLOAT, output_layout="CHW",
                     mean=[255 * m for m in CLIP_MEAN], std=[255 * s for s in CLIP_STD])
    if train:
        # Decoding only the crop window saves most of the decode work for small crops.
        images = fn.decoders.image_random_crop(
            jpg, device=decode_device, output_type=types.RGB,
            random_area=[crop_min_scale, 1.0], random_aspect_ratio=[3 / 4, 4 / 3])
        mirror = fn.random.coin_flip(probability=0.5 if hflip else 0.0)
        if crops_out:
            return images, mirror, tok, lbl, idx, mod  # finish_crops does the rest
        images = fn.resize(images, size=[image_size, image_size], interp_type=types.INTERP_LINEAR)
        images = fn.crop_mirror_normalize(images, mirror=mirror, **normalize)
    else:
        # Same sizes and rounding as pil.eval_crop, so predict's preprocess_image matches eval.
        images = fn.decoders.image(jpg, device=decode_device, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=image_size, interp_type=types.INTERP_CUBIC,
                           antialias=True, subpixel_scale=False)
        images = fn.crop_mirror_normalize(images, crop=[image_size, image_size],
                                          crop_pos_x=0.5, crop_pos_y=0.5, **normalize)
    # tok, lbl, idx and mod stay on the host, even with a GPU: the loader checks and counts on
    # them there without waiting for the device, then copies what the model needs
    return images, tok, lbl, idx, mod


def finish_crops(crops, mirror, images: torch.Tensor) -> torch.Tensor:
    """DALI's uint8 HWC crops (any sizes) and flip flags -> `images` float32 [B, 3, S, S]: what
    fn.resize(INTERP_LINEAR, antialiased) + crop_mirror_normalize make on a GPU."""
    flips = np.asarray(mirror.as_tensor()).reshape(-1).astype(bool)
    size = images.shape[-2:]
    with one_torch_thread():
        for row, crop in enumerate(crops):
            # an HWC array seen as a channels-last [1, 3, H, W] tensor: torch's vectorized uint8 path
            image = torch.from_numpy(np.asarray(crop)).permute(2, 0, 1)[None]
            image = F.interpolate(image, size=size, mode="bilinear", antialias=True)[0]
            normalize(image.flip(-1) if flips[row] else image, out=images[row])
    return images


@contextmanager
def one_torch_thread():
    """Ops on one image are too small to share out: on more threads they mostly make the idle
    OpenMP workers spin (docs/MEASUREMENTS.md)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class BatchBuffers:
    """Float batches handed out again once nobody holds them. A fresh [64, 3, 224, 224] batch
    (38 MB) costs page faults on every use (docs/MEASUREMENTS.md): glibc maps every allocation
    over 32 MB anew. A buffer is reused only when no tensor or view of it is left:
    torch.from_numpy keeps its array alive, so a held buffer's array has one more reference."""

    def __init__(self, keep: int = 4):
        self.keep, self.arrays = keep, []
        self.unheld = None  # the reference count of a buffer nobody holds, as _references sees it

    def _references(self, slot: int) -> int:
        # always read through this one function: how many references the interpreter itself
        # holds here varies between Python versions, so it is measured, never assumed
        return sys.getrefcount(self.arrays[slot])

    def take(self, shape: tuple) -> torch.Tensor:
        for slot in range(len(self.arrays)):  # no loop variable: it would be one more reference
            if self.arrays[slot].shape == shape and self._references(slot) == self.unheld:
                return torch.from_numpy(self.arrays[slot])
        if len(self.arrays) == self.keep:
            return torch.from_numpy(np.empty(shape, np.float32))
        self.arrays.append(np.empty(shape, np.float32))
        self.unheld = self._references(len(self.arrays) - 1)  # no tensor of it exists yet
        return torch.from_numpy(self.arrays[-1])


def pipeline_seed(seed: int, rank: int) -> int:
    """Each rank gets its own shuffling and augmentation stream, all derived from `seed`."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1)[0] & 0x7FFFFFFF)


class DaliLoader(BatchLoader):
    backend = "dali"

    def __init__(self, dataset, split, **arguments):
        super().__init__(dataset, split, **arguments)
        if self.device.type == "cuda" and self.device.index is None:  # DALI needs the GPU's number
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.crops_on_host = self.train and self.device.type != "cuda"  # see the module docstring
        self._buffers = BatchBuffers()
        self.pipeline = None
        self._restore_from = None  # a checkpoint to build the next pipeline from
        self._maker = None  # reads an elastic resume's rest of an epoch (batch.py)
        # The loader epoch a fresh pipeline starts in (an elastic resume starts one mid-run): the
        # reader begins with shard (rank + epoch) % world_size and turns from there, as batch.py says
        self._first_epoch = 0

    def _build_pipeline(self):
        on_gpu = self.device.type == "cuda"
        pipeline = clip_pipeline(
            paths=self.dataset.shard_paths(self.split), index_paths=self.dataset.index_paths(self.split),
            shard_id=(self.rank + self._first_epoch) % self.world_size, num_shards=self.world_size, train=self.train,
            shuffle_buffer=self.config.shuffle_buffer, image_size=self.image_size,
            crop_min_scale=self.config.crop_min_scale, hflip=self.config.hflip, on_gpu=on_gpu,
            crops_out=self.crops_on_host,
            batch_size=self.batch_size, num_threads=max(1, self.config.workers),
            device_id=self.device.index if on_gpu else None,
            seed=pipeline_seed(self.seed, self.rank), checkpoint=self._restore_from)
        pipeline.build()
        return pipeline

    def _raw_batches(self, epoch, position):
        if self.pipeline is None:
            if self._restore_from is None:
                self._first_epoch = epoch
            self.pipeline = self._build_pipeline()
        # The pipeline's reader keeps its own epoch; one run = one batch, and an epoch ends after
        # exactly len(self) runs (the padding makes it so), so it stays in step with self.position.
        # The dynamic executor (DALI 2's default) hands each run fresh buffers: share, don't copy.
        copy = not self.pipeline.exec_dynamic
        for _ in range(len(self) - position):
            try:
                outputs = self.pipeline.run()
            except RuntimeError as error:  # DALI names neither the shard nor the sample
                from .integrity import find_damage

                raise DataError(f"DALI failed reading split {self.split!r} of {self.dataset.root} "
                                f"({str(error).strip().splitlines()[0][:120]}): {find_damage(self.dataset, self.split)}") from error
            with torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext():
                if self.crops_on_host:
                    images = finish_crops(*outputs[:2], self._buffers.take(
                        (self.batch_size, 3, self.image_size, self.image_size)))
                else:
                    images = to_torch_tensor(outputs[0].as_tensor(), copy=copy)
                batch = {name: to_torch_tensor(output.as_tensor(), copy=copy)
                         for name, output in zip(OUTPUTS, outputs[-len(OUTPUTS):])}
            yield {"pixel_values": images, **batch}

    def _sample_maker(self):
        if self._maker is None:
            from .pil import BatchMaker, SampleTable

            table = SampleTable(self.dataset.shard_paths(self.split), self.dataset.index_paths(self.split))
            self._maker = BatchMaker(self, table)
        return self._maker

    def _backend_state(self):
        checkpoint = self.pipeline.checkpoint() if self.pipeline is not None else self._restore_from
        return {"dali_checkpoint": None if checkpoint is None else base64.b64encode(checkpoint).decode(),
                "dali_first_epoch": self._first_epoch}

    def _load_backend_state(self, state):
        self._first_epoch = state.get("dali_first_epoch", 0)
        checkpoint = state.get("dali_checkpoint")
        self._restore_from = None if checkpoint is None else base64.b64decode(checkpoint)
        self.pipeline = None  # rebuilt from the checkpoint on the next iteration
