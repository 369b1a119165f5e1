"""The synthetic photo-and-title catalogue: readable by `cmaclip shards`, deterministic, and each
task carried by the modality the generator promises."""
import json

import numpy as np
from PIL import Image

from cmaclip.data import synthetic
from cmaclip.data.format import load_dataset_info
from cmaclip.data.shards import write_shards


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_catalogue_is_deterministic_and_becomes_shards(tmp_path):
    first = synthetic.write_catalog(tmp_path / "a", products=60, seed=3)
    second = synthetic.write_catalog(tmp_path / "b", products=60, seed=3)
    assert first.read_text() == second.read_text()
    info = write_shards(first, list(synthetic.TASKS), tmp_path / "shards", val_fraction=0.2)
    assert info["skipped"] == []
    dataset = load_dataset_info(tmp_path / "shards")
    assert dataset.num_samples("train") + dataset.num_samples("val") == 60
    assert set(dataset.tasks) == set(synthetic.TASKS)


def test_each_task_lives_in_the_modality_it_is_said_to(tmp_path):
    path = synthetic.write_catalog(tmp_path, products=120, seed=0)
    rows = read_rows(path)
    titled = [row for row in rows if row["text"]]
    for row in titled:
        words = row["text"].lower()
        labels = row["labels"]
        assert any(name in words for name in synthetic.MATERIALS[labels["material"]])  # title only
        assert not any(pattern in words.split() for pattern in synthetic.PATTERNS)  # photo only
        assert labels["colour"] not in words.split()  # photo only (a colour word in a title is a wrong one)
    # the photo's saturated pixels (the product, not the greyish background) have the label's colour
    palette = {name: np.array(rgb) for name, rgb in synthetic.COLOURS.items()}
    pictured = [row for row in rows if "image" in row]
    for row in pictured:
        pixels = np.asarray(Image.open(tmp_path / row["image"]).convert("RGB")).reshape(-1, 3).astype(int)
        product = pixels[pixels.max(axis=1) - pixels.min(axis=1) > 80]
        median = np.median(product, axis=0)
        assert min(palette, key=lambda name: np.abs(palette[name] - median).sum()) == row["labels"]["colour"]
    named = sum(any(n in row["text"].lower().split() for n in synthetic.CATEGORIES[row["labels"]["category"]])
                for row in titled)
    assert 0.5 < named / len(titled) < 0.9  # the category: named in most titles, drawn in every photo
    assert len(pictured) < len(rows) and len(titled) < len(rows)  # some products lack one modality


def test_command_line(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--products", "5", "--seed", "1"])
    assert "5 products" in capsys.readouterr().out
    assert len(read_rows(tmp_path / "catalog.jsonl")) == 5
