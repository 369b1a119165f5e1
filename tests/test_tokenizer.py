"""The offline CLIP tokenizer gives open_clip's ids, in the shard layout [SOT ... EOT 0 ...]."""
import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cmaclip.data import tokenizer as tokenizer_module
from cmaclip.data.format import EOT_TOKEN_ID, SOT_TOKEN_ID, attention_mask_from_tokens
from cmaclip.data.tokenizer import ClipTokenizer, load_tokenizer

SAMPLES = [
    "Turtle Check Men Navy Blue Shirt",
    "  Puma  Men   Black Shoes ",                  # the catalogue's odd whitespace
    "\t\n tab\u00a0nbsp\u2003em-space\r\n",
    "",
    "Café crème brûlée 日本語 😀 naïve ÄÖÜ ß",
    "Reid &amp; Taylor Men&#39;s shirt",             # HTML entities: open_clip unescapes them
    "Ã©tÃ© mojibake",                                # ftfy repairs it
    "I'm they'll WE'RE 123.45 4x 100% cotton!!!",
    "a <|endoftext|> b",                             # HF's special-token text stays plain text
    "x" * 300,
    " ".join(f"word{i}" for i in range(100)),        # far longer than the context: truncated
]


@pytest.fixture(scope="module")
def reference():
    # open_clip's package __init__ imports torchvision (not installed): load tokenizer.py by path.
    # find_spec of a top-level package locates it without running its __init__.
    package_dir = Path(importlib.util.find_spec("open_clip").origin).parent
    spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", package_dir / "tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.mark.parametrize("context_length", [77, 16])
def test_ids_equal_open_clip(reference, context_length):
    ours = load_tokenizer(context_length).encode(SAMPLES)
    theirs = reference(SAMPLES, context_length=context_length).numpy()
    assert ours.dtype == np.int32 and ours.shape == (len(SAMPLES), context_length)
    for text, a, b in zip(SAMPLES, ours, theirs):
        assert a.tolist() == b.tolist(), repr(text)


def test_layout_and_truncation():
    ids = load_tokenizer(8).encode(["", "red shirt", " ".join(["blue"] * 50)])
    assert ids[0].tolist() == [SOT_TOKEN_ID, EOT_TOKEN_ID, 0, 0, 0, 0, 0, 0]
    assert ids[1, 0] == SOT_TOKEN_ID and ids[1, 3] == EOT_TOKEN_ID and not ids[1, 4:].any()
    assert ids[2, 0] == SOT_TOKEN_ID and ids[2, -1] == EOT_TOKEN_ID and (ids[2, 1:-1] != 0).all()
    assert attention_mask_from_tokens(ids).sum(-1).tolist() == [2, 4, 8]
    assert load_tokenizer(8).encode([]).shape == (0, 8)


def test_decode_and_tokens():
    tokenizer = load_tokenizer()
    ids = tokenizer.encode(["Turtle  Check Men Navy Blue Shirt"])[0]
    assert tokenizer.decode(ids) == "turtle check men navy blue shirt"
    assert tokenizer.tokens(ids)[1:-1] == ["turtle", "check", "men", "navy", "blue", "shirt"]
    exclaimed = tokenizer.encode(["wow !~ shirt"])[0]  # "!" (inside a word) is id 0, the padding value too
    assert exclaimed[2] == 0 and tokenizer.decode(exclaimed) == "wow !~ shirt"


def test_converted_vocab_is_cached_by_hash(tmp_path, monkeypatch):
    monkeypatch.setenv("CMACLIP_CACHE", str(tmp_path))
    first = tokenizer_module.converted_vocab_dir()
    assert first.parent == tmp_path and sorted(p.name for p in tmp_path.iterdir()) == [first.name]
    mtime = (first / "vocab.json").stat().st_mtime_ns
    assert tokenizer_module.converted_vocab_dir() == first
    assert (first / "vocab.json").stat().st_mtime_ns == mtime  # not rewritten
    assert ClipTokenizer(77).encode(["navy shirt"]).tolist() == load_tokenizer(77).encode(["navy shirt"]).tolist()


def test_rejects_a_bare_string_and_tiny_context():
    with pytest.raises(TypeError):
        load_tokenizer().encode("a title")
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(1)


def test_special_token_text_in_a_title_stays_text():
    # open_clip maps "<start_of_text>" in a title to its SOT id; we keep every title plain text.
    ids = load_tokenizer().encode(["a <start_of_text> b <end_of_text> c <|startoftext|> <|endoftext|> d"])[0]
    end = int(np.argmax(ids == EOT_TOKEN_ID))
    assert ids[0] == SOT_TOKEN_ID and end > 10
    assert SOT_TOKEN_ID not in ids[1:end] and EOT_TOKEN_ID not in ids[1:end]


def test_unwritable_cache_falls_back_to_a_private_copy(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("CMACLIP_CACHE", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the private copies land here, cleaned up
    folder = tokenizer_module.converted_vocab_dir()
    assert (folder / "vocab.json").is_file() and folder.parent == tmp_path
    assert ClipTokenizer(77).encode(["navy shirt"]).tolist() == load_tokenizer(77).encode(["navy shirt"]).tolist()
