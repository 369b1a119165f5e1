"""The CLIP text tokenizer, offline: OpenAI's BPE vocabulary (shipped in data/assets) behind Hugging
Face's CLIPTokenizer, producing exactly the ids open_clip's SimpleTokenizer produces.

    tokenizer = load_tokenizer(context_length=77)
    ids = tokenizer.encode(["Turtle Check Men Navy Blue Shirt", ""])   # int32 [2, 77]

Rows are [SOT, title tokens..., EOT, 0, 0, ...]; a title too long for the context keeps its first
context_length - 2 tokens and still ends in EOT (open_clip's truncation). Padding is 0, not HF's
EOT padding, so the first EOT marks the end of the text (format.attention_mask_from_tokens).

One deliberate difference: open_clip turns the literal text "<start_of_text>" / "<end_of_text>"
inside a title into its special ids; here every title is plain text (HF's own special-token
strings included), so a seller's title can never inject a start or end of text.

The vocabulary file is a gzipped list of merges; HF reads a vocab.json + merges.txt pair. We
convert once and cache the pair under ~/.cache/cmaclip (or $CMACLIP_CACHE) in a folder named by
the vocabulary's hash, so a changed vocabulary can never be read from a stale cache.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import html
import json
import os
import tempfile
from pathlib import Path

import ftfy
import numpy as np

from cmaclip.data.format import EOT_TOKEN_ID, PAD_TOKEN_ID, SOT_TOKEN_ID

VOCAB_PATH = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77
# The merges file holds more merges than CLIP uses: CLIP keeps 49152 - 256 bytes - 2 special tokens.
NUM_MERGES = 49152 - 256 - 2
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: fix mojibake, unescape HTML twice, collapse whitespace, lowercase.
    HF's CLIPTokenizer normalizes differently (no ftfy, no HTML unescaping), so we clean first and
    its own normalization then changes nothing."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


def byte_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable character table, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shifted)
            shifted += 1
    return [chr(code) for code in codes]


def convert_vocab(vocab_gz: Path, out_dir: Path) -> None:
    """Write vocab.json + merges.txt for `vocab_gz`, ids in CLIP's order: 256 byte characters, the
    same with the end-of-word suffix, one token per merge, then SOT (49406) and EOT (49407)."""
    lines = gzip.open(vocab_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    chars = byte_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    assert vocab[SOT_TOKEN] == SOT_TOKEN_ID and vocab[EOT_TOKEN] == EOT_TOKEN_ID and len(vocab) == VOCAB_SIZE
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def cache_root() -> Path:
    if os.environ.get("CMACLIP_CACHE"):
        return Path(os.environ["CMACLIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmaclip"


def converted_vocab_dir(vocab_gz: Path = VOCAB_PATH) -> Path:
    """The cached vocab.json + merges.txt folder for `vocab_gz`, converting on first use. Written to
    a temporary folder and renamed, so concurrent processes never see a half-written pair."""
    digest = hashlib.sha256(vocab_gz.read_bytes()).hexdigest()[:16]
    target = cache_root() / f"clip-bpe-{digest}"
    if (target / "merges.txt").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    except OSError:  # no writable cache (e.g. a read-only home on a cluster): convert for this process only
        staging = Path(tempfile.mkdtemp(prefix=target.name + "."))
        convert_vocab(vocab_gz, staging)
        return staging
    convert_vocab(vocab_gz, staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first: theirs is identical
        for name in ("vocab.json", "merges.txt"):
            (staging / name).unlink()
        staging.rmdir()
    return target


class ClipTokenizer:
    """CLIP BPE ids as fixed-length int32 rows, the layout the shards store (format.py `tok`)."""

    def __init__(self, context_length: int = DEFAULT_CONTEXT_LENGTH, vocab_gz: Path = VOCAB_PATH):
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        from transformers import CLIPTokenizer  # heavy import: only when a tokenizer is built

        folder = converted_vocab_dir(Path(vocab_gz))
        # Positional paths: transformers 5.x silently ignores vocab_file=/merges_file= keywords.
        self.hf = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
        self.context_length = context_length

    def encode(self, texts: list[str]) -> np.ndarray:
        """int32 [len(texts), context_length]: [SOT, tokens..., EOT, 0...]; "" gives [SOT, EOT, 0...]."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of titles; wrap a single title in a list")
        cleaned = [clean_text(text) for text in texts]
        # split_special_tokens: a title that literally contains "<|endoftext|>" is text, as in open_clip.
        token_lists = []
        if cleaned:
            token_lists = self.hf(cleaned, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        out = np.full((len(texts), self.context_length), PAD_TOKEN_ID, dtype=np.int32)
        keep = self.context_length - 2
        for row, tokens in zip(out, token_lists):
            tokens = tokens[:keep]
            row[0] = SOT_TOKEN_ID
            row[1 : len(tokens) + 1] = tokens
            row[len(tokens) + 1] = EOT_TOKEN_ID
        return out

    def decode(self, ids) -> str:
        """The cleaned text of one row of ids: the tokens between SOT and the first EOT. (Padding
        cannot be told apart by value: id 0 is also the token "!".)"""
        ids = self.until_eot(ids)
        return self.hf.decode([i for i in ids if i not in (SOT_TOKEN_ID, EOT_TOKEN_ID)]).strip()

    def tokens(self, ids) -> list[str]:
        """The readable token of each id up to and including the first EOT (for attention pictures)."""
        return [self.hf.decode([i]).strip() or self.hf.convert_ids_to_tokens(i) for i in self.until_eot(ids)]

    @staticmethod
    def until_eot(ids) -> list[int]:
        ids = [int(i) for i in np.asarray(ids).ravel()]
        return ids[: ids.index(EOT_TOKEN_ID) + 1] if EOT_TOKEN_ID in ids else ids


@functools.lru_cache(maxsize=8)
def load_tokenizer(context_length: int = DEFAULT_CONTEXT_LENGTH) -> ClipTokenizer:
    """The process-wide tokenizer for `context_length` (built once per process)."""
    return ClipTokenizer(context_length)
