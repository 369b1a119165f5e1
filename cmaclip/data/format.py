"""The shard format: what one sample holds and what `dataset.json` says. Writer and readers share it.

One sample = one product, stored under the key `<split>-<index:09d>` with these components:

    jpg  the product photo as JPEG bytes (the original file when it is a valid, small-enough JPEG)
    txt  the raw title, UTF-8
    id   the product id, UTF-8
    tok  the title's CLIP BPE token ids: int32[context_length], [SOT, ..., EOT, 0, 0, ...]
    lbl  the labels: int32[number of tasks] in dataset.json's task order, -1 = label missing
    idx  the sample's index within its split: int32[1] (lets evaluation count each sample once)
    mod  which modalities are present: int32[2] = [text, image], 1 = present

int32 components are raw little-endian bytes, so DALI reads them as dense tensors (`dtypes`).
A text-only product carries a placeholder JPEG with mod[IMAGE] = 0; a product without a title has
an empty `txt`, tokens [SOT, EOT] and mod[TEXT] = 0. The attention mask is derived from `tok`:
every position up to and including the first EOT.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cmaclip.errors import DataError

FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
SPLITS = ("train", "val", "test")
COMPONENTS = ("jpg", "txt", "id", "tok", "lbl", "idx", "mod")
INT32_COMPONENTS = ("tok", "lbl", "idx", "mod")

# Modality order everywhere (sequence [T; I], modality weights, masks): text first, then image.
TEXT, IMAGE = 0, 1
MODALITIES = ("text", "image")

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0


def sample_key(split: str, index: int) -> str:
    return f"{split}-{index:09d}"


SHARD_NUMBER_DIGITS = 6


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:0{SHARD_NUMBER_DIGITS}d}.tar"


# Any name shard_name() gives, and its DALI index: the files a shards folder holds of ours.
SHARD_FILE = re.compile(rf"^({'|'.join(SPLITS)})-\d{{{SHARD_NUMBER_DIGITS}}}\.tar(\.idx)?$")


def encode_int32(values) -> bytes:
    return np.asarray(values, dtype="<i4").tobytes()


def decode_int32(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i4")


def attention_mask_from_tokens(tokens: np.ndarray) -> np.ndarray:
    """1 for every position up to and including the first EOT, 0 after (works on [..., L])."""
    is_eot = tokens == EOT_TOKEN_ID
    first_eot = np.where(is_eot.any(-1), is_eot.argmax(-1), tokens.shape[-1] - 1)
    positions = np.arange(tokens.shape[-1])
    return (positions <= first_eot[..., None]).astype(np.int64)


@dataclass
class SplitInfo:
    samples: int
    shards: list[str]


@dataclass
class DatasetInfo:
    """`dataset.json`, parsed. `tasks` keeps the file's order, which is the order of `lbl`."""

    root: Path
    tasks: dict[str, list[str]]
    splits: dict[str, SplitInfo]
    context_length: int
    skipped: list[dict] = field(default_factory=list)
    raw: dict = field(default_factory=dict)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / name) for name in self._split(split).shards]

    def index_paths(self, split: str) -> list[str]:
        return [path + ".idx" for path in self.shard_paths(split)]

    def num_samples(self, split: str) -> int:
        return self._split(split).samples

    def _split(self, split: str) -> SplitInfo:
        info = self.splits.get(split)
        if info is None or info.samples == 0:
            raise DataError(f"{self.root / DATASET_FILE}: split {split!r} has no samples "
                             f"(splits with samples: {[s for s, i in self.splits.items() if i.samples]})")
        return info


def load_dataset_info(shards_dir: str | Path) -> DatasetInfo:
    root = Path(shards_dir)
    path = root / DATASET_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {root} a folder written by `cmaclip shards`?")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); rewrite it with `cmaclip shards`") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version!r}, this cmaclip reads {FORMAT_VERSION}")
    try:
        return DatasetInfo(
            root=root,
            tasks={task: list(classes) for task, classes in raw["tasks"].items()},
            splits={name: SplitInfo(int(s["samples"]), list(s["shards"])) for name, s in raw["splits"].items()},
            context_length=int(raw["context_length"]),
            skipped=list(raw.get("skipped", [])),
            raw=raw,
        )
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise DataError(f"{path}: malformed ({type(error).__name__}: {error}); rewrite it with `cmaclip shards`") from None
