"""The shard writer: catalogue -> shards that webdataset and DALI read back sample by sample; bad rows
skipped and reported; structural errors and crashes leave nothing a reader would accept."""
import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cmaclip.data import shards as shards_module
from cmaclip.data.catalog import placeholder_jpeg
from cmaclip.data.format import (COMPONENTS, DATASET_FILE, EOT_TOKEN_ID, IMAGE, SOT_TOKEN_ID, TEXT, decode_int32,
                                 load_dataset_info)
from cmaclip.data.shards import assign_split, main, write_shards
from cmaclip.data.tokenizer import load_tokenizer
from conftest import FASHION_DIR, FASHION_TASKS

TASKS = ["colour", "kind"]


# ---- readers --------------------------------------------------------------------------------

def read_webdataset(shards_dir, split) -> list[dict]:
    import webdataset

    info = load_dataset_info(shards_dir)
    dataset = webdataset.WebDataset(info.shard_paths(split), shardshuffle=False, empty_check=False)
    return [{ext: sample[ext] for ext in COMPONENTS} | {"key": sample["__key__"]} for sample in dataset]


def read_dali(shards_dir, split) -> list[dict]:
    """Every sample of the split through DALI's reader (with our index files) and CPU decoder."""
    from nvidia.dali import fn, pipeline_def, types

    info = load_dataset_info(shards_dir)
    count = info.num_samples(split)

    @pipeline_def(batch_size=count, num_threads=1, device_id=None)
    def pipeline():
        jpg, txt, ids, tok, lbl, idx, mod = fn.readers.webdataset(
            paths=info.shard_paths(split), index_paths=info.index_paths(split), ext=list(COMPONENTS),
            dtypes=[types.UINT8] * 3 + [types.INT32] * 4, random_shuffle=False, name="Reader")
        return jpg, fn.decoders.image(jpg, device="cpu", output_type=types.RGB), txt, ids, tok, lbl, idx, mod

    outputs = pipeline()
    outputs.build()
    batch = outputs.run()
    return [{"jpg": bytes(np.asarray(batch[0][i])), "pixels": np.asarray(batch[1][i]),
             "txt": bytes(np.asarray(batch[2][i])), "id": bytes(np.asarray(batch[3][i])),
             "tok": np.asarray(batch[4][i]), "lbl": np.asarray(batch[5][i]),
             "idx": np.asarray(batch[6][i]), "mod": np.asarray(batch[7][i])} for i in range(count)]


def assert_readers_agree(shards_dir, split) -> list[dict]:
    """webdataset and DALI return the same samples in the same order; returns webdataset's."""
    plain, dali = read_webdataset(shards_dir, split), read_dali(shards_dir, split)
    assert len(plain) == len(dali) == load_dataset_info(shards_dir).num_samples(split)
    for index, (a, b) in enumerate(zip(plain, dali)):
        assert a["key"] == f"{split}-{index:09d}"
        for ext in ("jpg", "txt", "id"):
            assert a[ext] == b[ext], (a["key"], ext)
        for ext in ("tok", "lbl", "idx", "mod"):
            assert decode_int32(a[ext]).tolist() == b[ext].tolist(), (a["key"], ext)
        assert decode_int32(a["idx"]).tolist() == [index]
        assert b["pixels"].ndim == 3 and b["pixels"].shape[2] == 3
    return plain


# ---- round trip: the embedded CSV ----------------------------------------------------------------

def test_csv_round_trip_embedded_products(fashion_shards, fashion_csv):
    info = load_dataset_info(fashion_shards)
    assert info.task_names == FASHION_TASKS
    rows = {row["id"]: row for row in csv.DictReader(open(fashion_csv, encoding="utf-8"))}
    seen = []
    for split in ("train", "val"):
        assert len(info.shard_paths(split)) == -(-info.num_samples(split) // 16)
        for sample in assert_readers_agree(fashion_shards, split):
            row = rows[sample["id"].decode()]
            seen.append(row["id"])
            assert sample["txt"].decode() == row["productDisplayName"]  # raw, odd whitespace kept
            assert sample["jpg"] == (FASHION_DIR / row["image"]).read_bytes()  # a clean JPEG: original bytes
            tokens = decode_int32(sample["tok"])
            assert tokens.tolist() == load_tokenizer(77).encode([row["productDisplayName"]])[0].tolist()
            labels = decode_int32(sample["lbl"])
            for task, label in zip(FASHION_TASKS, labels):
                assert (info.tasks[task][label] if label >= 0 else None) == (
                    row[task] if row[task] in info.tasks[task] else None)
            assert decode_int32(sample["mod"]).tolist() == [1, 1]
    assert sorted(seen) == sorted(rows) and info.num_samples("val") > 10


def test_index_files_equal_wds2idx(fashion_shards, tmp_path):
    info = load_dataset_info(fashion_shards)
    ours = info.index_paths("val")[0]
    theirs = tmp_path / "val.idx"
    wds2idx = Path(sys.executable).parent / "wds2idx"
    subprocess.run([str(wds2idx), info.shard_paths("val")[0], str(theirs)], check=True, capture_output=True)
    assert Path(ours).read_text() == theirs.read_text()


@pytest.mark.parametrize("name,size", [("train-000000001.jpg", 0), ("val-000000000.tok", 308), ("x.y", 8**11 - 1)])
def test_tar_header_is_tarfiles_ustar_header(name, size):
    import tarfile

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    assert shards_module.tar_header(name, size) == info.tobuf(format=tarfile.USTAR_FORMAT)


# ---- round trip: JSONL with every kind of image and row ------------------------------------------

def picture(size=(40, 30)) -> Image.Image:
    """Left half red, right half blue: orientation and colour survive checks."""
    image = Image.new("RGB", size, (220, 20, 20))
    image.paste((20, 20, 220), (size[0] // 2, 0, size[0], size[1]))
    return image


def save(image: Image.Image, path: Path, fmt="JPEG", **options) -> str:
    image.save(path, format=fmt, **options)
    return path.name


def good_images(folder: Path) -> dict[str, str]:
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    rgba = picture().convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited on white
    return {
        "plain": save(picture(), folder / "plain.jpg"),
        "progressive": save(picture(), folder / "progressive.jpg", progressive=True),
        "png_alpha": save(rgba, folder / "alpha.png", "PNG"),
        "grey": save(picture().convert("L"), folder / "grey.jpg"),
        "cmyk": save(picture().convert("CMYK"), folder / "cmyk.jpg"),
        "rotated": save(picture(), folder / "rotated.jpg", exif=exif.tobytes()),
        "big": save(picture((900, 600)), folder / "big.jpg"),
    }


def bad_images(folder: Path) -> dict[str, str]:
    rng = random.Random(0)
    noise = Image.frombytes("RGB", (128, 128), bytes(rng.randrange(256) for _ in range(128 * 128 * 3)))
    data = io.BytesIO()
    noise.save(data, format="JPEG")
    data = data.getvalue()
    middle = len(data) // 2  # inside the entropy-coded data
    while data[middle - 1] == 0xFF:  # do not split a stuffed 0xFF 0x00
        middle += 1
    stray_marker = data[:middle] + b"\xff\xfe\x00\x04ab" + data[middle:]  # a comment segment mid-scan
    Image.open(io.BytesIO(stray_marker)).load()  # PIL decodes it (libjpeg only warns): the case to catch
    (folder / "truncated.jpg").write_bytes(data[:middle])
    (folder / "stray-marker.jpg").write_bytes(stray_marker)
    (folder / "not-an-image.jpg").write_text("hello")
    return {"truncated": "truncated.jpg", "garbage": "stray-marker.jpg", "text": "not-an-image.jpg"}


def product(row_id, image=None, text="a product", colour="red", kind="shirt", split=None, **extra):
    record = {"id": row_id, "text": text, "labels": {"colour": colour, "kind": kind}, **extra}
    if image is not None:
        record["image"] = image
    if split is not None:
        record["split"] = split
    return json.dumps(record)


@pytest.fixture(scope="module")
def jsonl_catalog(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl-catalog")
    good, bad = good_images(folder), bad_images(folder)
    lines = [product(name, image, text=f"{name} shirt", split="val" if name == "plain" else "train")
             for name, image in good.items()]
    good_count = len(lines)
    lines += [
        product("text-only", text="Blue  Denim Jeans", colour="blue", kind="jeans"),
        product("image-only", good["plain"], text="", colour="blue"),
        json.dumps({"id": 42, "image": good["plain"], "text": "int id, int label, one label missing",
                    "labels": {"colour": 7}}),
        "",  # blank lines are not rows
        product("missing-file", "nowhere.jpg"),
        product("truncated", bad["truncated"]),
        product("garbage", bad["garbage"]),
        product("not-image", bad["text"]),
        product("nothing", text=""),
        '{"id": "broken", "text": ',
        product("label-list", colour=["red", "blue"]),
        product("label-dict", kind={"a": 1}),
        product("plain", good["plain"]),  # duplicate id
        product("bad-split", split="holdout"),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "no id", "labels": {"colour": "red"}}),
        json.dumps({"id": "labels-list", "text": "x", "labels": ["red"]}),
        product("no-labels", colour=None, kind=""),
        product("nul-path", "bad\u0000name.jpg"),
        product("folder-as-image", "."),
        product("lone-surrogate-title", text="caf\ud800"),
        product("lone-surrogate-label", colour="r\udc80d"),
        product("bad\ud800id"),
        product("lone-surrogate-image", "caf\ud800.jpg"),
    ]
    path = folder / "catalog.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, good_count


EXPECTED_SKIPS = {  # line -> (id, reason start)
    12: ("missing-file", "image not found"),
    13: ("truncated", "image does not decode"),
    14: ("garbage", "corrupt JPEG"),
    15: ("not-image", "image does not decode"),
    16: ("nothing", "neither a title nor an image"),
    17: (None, "malformed JSON"),
    18: ("label-list", "labels.colour: expected a string or integer, got list"),
    19: ("label-dict", "labels.kind: expected a string or integer, got dict"),
    20: ("plain", "duplicate id (first seen on line 1)"),
    21: ("bad-split", "split: 'holdout' is not one of"),
    22: (None, "a JSON line must be an object"),
    23: (None, "id: missing"),
    24: ("labels-list", "labels: expected an object"),
    25: ("no-labels", "no label for any task"),
    26: ("nul-path", "image unreadable"),
    27: ("folder-as-image", "image unreadable"),
    28: ("lone-surrogate-title", "text: not valid Unicode"),
    29: ("lone-surrogate-label", "labels.colour: not valid Unicode"),
    30: ("bad\\ud800id", "id: not valid Unicode"),
    31: ("lone-surrogate-image", "image unreadable"),
}


def test_csv_bad_rows_are_skipped_and_reported(tmp_path):
    save(picture(), tmp_path / "ok.jpg")
    long_title = "x" * 200_000  # over the csv module's field limit
    text = ("id,image,title,colour,kind\n"
            "1,ok.jpg,red shirt,red,shirt\n"
            '2,,"a title on\ntwo lines",blue,\n'           # text-only, kind missing; lines 3-4
            "3,ok.jpg,too few fields\n"
            "4,,,red,shirt\n"                               # neither title nor image
            "5,gone.jpg,missing image,red,shirt\n"
            "1,ok.jpg,duplicate,red,shirt\n"
            f"7,ok.jpg,{long_title},red,shirt\n"
            "  ,ok.jpg,blank id,red,shirt\n")
    catalog = tmp_path / "catalog.csv"
    catalog.write_bytes(text.encode() + b"8,ok.jpg,caf\xe9 latin-1,red,shirt\n")
    dataset = write_shards(catalog, TASKS, tmp_path / "out", text_column="title", val_fraction=0.0)
    assert [(s["line"], s["id"], s["reason"].split(":")[0].split(" (")[0]) for s in dataset["skipped"]] == [
        (5, "3", "row has 3 fields, the header has 5"), (6, "4", "neither a title nor an image"),
        (7, "5", "image not found"), (8, "1", "duplicate id"), (9, None, "malformed CSV"),
        (10, None, "id"), (11, "8", "not valid UTF-8")]
    samples = {s["id"].decode(): s for s in read_webdataset(tmp_path / "out", "train")}
    assert sorted(samples) == ["1", "2"] and samples["2"]["txt"] == b"a title on\ntwo lines"
    assert decode_int32(samples["2"]["lbl"]).tolist() == [0, -1]


def test_large_photos_are_shrunk_and_damage_is_still_found(tmp_path):
    from cmaclip.data.catalog import BadRow, prepare_image

    save(picture((900, 600)), tmp_path / "big.jpg", quality=95)
    data, note = prepare_image(tmp_path / "big.jpg", max_side=128)  # >= 2x: libjpeg scales while decoding
    shrunk = np.asarray(Image.open(io.BytesIO(data)))
    assert note == "reencoded: larger than 128 px" and shrunk.shape == (85, 128, 3)
    assert shrunk[40, 10, 0] > 180 and shrunk[40, 120, 2] > 180  # still red left, blue right
    full = (tmp_path / "big.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(full[: len(full) * 3 // 4])
    with pytest.raises(BadRow, match="does not decode"):
        prepare_image(tmp_path / "cut.jpg", max_side=128)


@pytest.fixture(scope="module")
def jsonl_shards(tmp_path_factory, jsonl_catalog):
    out = tmp_path_factory.mktemp("jsonl-shards") / "out"
    write_shards(jsonl_catalog[0], TASKS, out, val_fraction=0.0, samples_per_shard=4, max_side=512)
    return out


def test_bad_rows_are_skipped_and_reported(jsonl_shards):
    skipped = load_dataset_info(jsonl_shards).skipped
    assert {s["line"]: s["id"] for s in skipped} == {line: row_id for line, (row_id, _) in EXPECTED_SKIPS.items()}
    for record in skipped:
        assert record["reason"].startswith(EXPECTED_SKIPS[record["line"]][1]), record


def test_jsonl_round_trip_images_text_and_labels(jsonl_shards, jsonl_catalog):
    info = load_dataset_info(jsonl_shards)
    assert info.tasks == {"colour": ["7", "blue", "red"], "kind": ["jeans", "shirt"]}
    samples = {}
    for split in ("train", "val"):
        for sample in assert_readers_agree(jsonl_shards, split):
            samples[sample["id"].decode()] = sample
    assert len(samples) == jsonl_catalog[1] + 3 and samples["plain"]["key"].startswith("val-")
    images = {row_id: Image.open(io.BytesIO(s["jpg"])) for row_id, s in samples.items()}
    assert all(image.format == "JPEG" and image.mode == "RGB" for image in images.values())
    assert images["big"].size == (512, 341)
    assert images["rotated"].size == (30, 40)  # EXIF rotation baked in
    top, bottom = np.asarray(images["rotated"])[2, 15], np.asarray(images["rotated"])[37, 15]
    assert top[0] > 150 > top[2] and bottom[2] > 150 > bottom[0]  # red half now on top
    assert np.asarray(images["png_alpha"]).min() > 240  # transparent -> white
    stored = json.loads((jsonl_shards / DATASET_FILE).read_text())["images"]
    assert stored["original"] == 4 and stored["placeholder"] == 1  # plain, progressive, image-only, 42
    assert {"reencoded: PNG image", "reencoded: L JPEG", "reencoded: CMYK JPEG", "reencoded: EXIF rotation",
            "reencoded: larger than 512 px"} <= set(stored)

    text_only, image_only = samples["text-only"], samples["image-only"]
    assert text_only["jpg"] == placeholder_jpeg() and text_only["txt"] == b"Blue  Denim Jeans"
    assert decode_int32(text_only["mod"])[[TEXT, IMAGE]].tolist() == [1, 0]
    assert decode_int32(image_only["mod"])[[TEXT, IMAGE]].tolist() == [0, 1]
    assert decode_int32(image_only["tok"])[:3].tolist() == [SOT_TOKEN_ID, EOT_TOKEN_ID, 0]
    assert decode_int32(samples["42"]["lbl"]).tolist() == [0, -1]  # int label "7", kind missing
    assert decode_int32(text_only["lbl"]).tolist() == [1, 0]


# ---- determinism: splits, order, vocabulary ------------------------------------------------------

def test_split_assignment_is_a_stable_hash():
    ids = [f"product-{i}" for i in range(2000)]
    splits = [assign_split(i, 0.1, 0.2) for i in ids]
    assert splits == [assign_split(i, 0.1, 0.2) for i in ids]
    shares = {name: splits.count(name) / len(ids) for name in ("train", "val", "test")}
    assert abs(shares["val"] - 0.1) < 0.03 and abs(shares["test"] - 0.2) < 0.03
    # growing val takes rows from train only: earlier val/test rows stay where they were
    assert all(b == a for a, b in zip(splits, (assign_split(i, 0.15, 0.2) for i in ids)) if a != "train")


def test_shuffled_rows_give_identical_shards(tmp_path, fashion_csv):
    rows = list(csv.reader(open(fashion_csv, encoding="utf-8")))
    header, body = rows[0], rows[1:]
    random.Random(1).shuffle(body)
    shuffled = tmp_path / "shuffled.csv"
    with open(shuffled, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows([header] + body)
    options = dict(image_root=FASHION_DIR, text_column="productDisplayName", val_fraction=0.25, samples_per_shard=16)
    first = write_shards(fashion_csv, FASHION_TASKS, tmp_path / "a", **options)
    second = write_shards(shuffled, FASHION_TASKS, tmp_path / "b", workers=2, **options)
    assert first["tasks"] == second["tasks"] and first["splits"] == second["splits"]
    for classes in first["tasks"].values():
        assert classes == sorted(classes)
    for name in [n for split in first["splits"].values() for n in split["shards"]]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
        assert (tmp_path / "a" / (name + ".idx")).read_bytes() == (tmp_path / "b" / (name + ".idx")).read_bytes()


def test_rare_classes_become_missing_labels(tmp_path, fashion_csv):
    tasks = ["baseColour", "usage"]
    dataset = write_shards(fashion_csv, tasks, tmp_path / "out", image_root=FASHION_DIR,
                           text_column="productDisplayName", val_fraction=0.25, min_class_count=5)
    rows = list(csv.DictReader(open(fashion_csv, encoding="utf-8")))
    train = [row for row in rows if assign_split(row["id"], 0.25, 0.0) == "train"]
    kept = {task: sorted({r[task] for r in train if sum(t[task] == r[task] for t in train) >= 5}) for task in tasks}
    assert dataset["tasks"] == kept
    dropped = dataset["dropped_classes"]["classes"]["baseColour"]
    assert set(dropped) == {r["baseColour"] for r in rows} - set(kept["baseColour"])
    all_rare = {r["id"] for r in rows if all(r[task] not in kept[task] for task in tasks)}
    assert all_rare and {s["id"] for s in dataset["skipped"]} == all_rare
    assert all(s["reason"] == "every label is a class with fewer than 5 training samples" for s in dataset["skipped"])
    missing = sum(r["baseColour"] not in kept["baseColour"] and r["id"] not in all_rare for r in train)
    assert dataset["label_counts"]["baseColour"]["train"]["(missing)"] == missing


def test_vocab_from_reuses_classes(tmp_path, fashion_shards, fashion_csv):
    dataset = write_shards(fashion_csv, ["usage", "gender"], tmp_path / "out", image_root=FASHION_DIR,
                           text_column="productDisplayName", val_fraction=0.0, vocab_from=fashion_shards)
    reference = load_dataset_info(fashion_shards).tasks
    assert dataset["tasks"] == {"usage": reference["usage"], "gender": reference["gender"]}


# ---- structural errors and crashes ---------------------------------------------------------------

def run_main(args) -> int:
    try:
        main(args)
    except SystemExit as exit_:
        return exit_.code
    return 0


@pytest.mark.parametrize("case", ["missing input", "csv column", "jsonl task", "no usable rows", "bad fraction"])
def test_structural_errors_exit_nonzero_and_write_nothing(case, tmp_path, fashion_csv, capsys):
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(product("a", text="red shirt") + "\n")
    args = {
        "missing input": ["--input", str(tmp_path / "nope.csv"), "--tasks", "colour"],
        "csv column": ["--input", str(fashion_csv), "--text-column", "productDisplayName", "--tasks", "usage,colour"],
        "jsonl task": ["--input", str(catalog), "--tasks", "colour,material"],
        "no usable rows": ["--input", str(catalog), "--tasks", "colour", "--val-fraction", "0.99"],
        "bad fraction": ["--input", str(catalog), "--tasks", "colour", "--val-fraction", "0.7",
                         "--test-fraction", "0.4"],
    }[case]
    code = run_main(args + ["--out", str(tmp_path / "out"), "--quiet"])
    message = capsys.readouterr().err
    assert code == 1 and message.startswith("cmaclip shards: error:") and message.count("\n") == 1
    assert {"missing input": "not found", "csv column": "'colour' not in the header",
            "jsonl task": "'material' appear in no row", "no usable rows": "no usable training rows",
            "bad fraction": "val + test < 1"}[case] in message
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_overwrite(tmp_path, jsonl_catalog, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = run_main(["--input", str(jsonl_catalog[0]), "--tasks", "colour,kind", "--out", str(out), "--quiet"])
    assert code == 1 and "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    (out / "val-000005.tar").write_bytes(b"stale shard")
    code = run_main(["--input", str(jsonl_catalog[0]), "--tasks", "colour,kind", "--out", str(out),
                        "--overwrite", "--quiet", "--workers", "1"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    assert (out / "notes.txt").read_text() == "mine" and not (out / "val-000005.tar").exists()
    assert load_dataset_info(out).num_samples("train") > 0


def test_failure_mid_write_leaves_nothing_readable(tmp_path, jsonl_catalog, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()  # it existed before: the completed shards stay (a folder the run created is removed)
    real_write_shard, calls = shards_module.write_shard, []

    def fail_on_third_shard(staging, final_tar, samples):
        calls.append(final_tar.name)
        if len(calls) == 3:
            (staging / (final_tar.name + ".partial")).write_bytes(b"half a tar")
            raise KeyboardInterrupt  # e.g. Ctrl-C mid-write
        real_write_shard(staging, final_tar, samples)

    monkeypatch.setattr(shards_module, "write_shard", fail_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        write_shards(jsonl_catalog[0], TASKS, out, val_fraction=0.0, samples_per_shard=2)
    assert sorted(p.name for p in out.iterdir()) == sorted(n for c in calls[:2] for n in (c, c + ".idx"))
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        load_dataset_info(out)
    monkeypatch.setattr(shards_module, "write_shard", fail_on_third_shard)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        write_shards(jsonl_catalog[0], TASKS, tmp_path / "new" / "out", val_fraction=0.0, samples_per_shard=2)
    assert not (tmp_path / "new").exists()  # created by the failed run: removed with it


CRASH_SCRIPT = """
import os, sys
from cmaclip.data import shards
real, calls = shards.tar_header, []
def header_then_crash(name, size):
    calls.append(name)
    if len(calls) == 30:  # in the middle of the second shard
        os._exit(9)        # like SIGKILL: no cleanup runs
    return real(name, size)
shards.tar_header = header_then_crash
shards.write_shards(sys.argv[1], ["colour", "kind"], sys.argv[2], val_fraction=0.0, samples_per_shard=3)
"""


def test_killed_run_leaves_only_complete_shards(tmp_path, jsonl_catalog):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(jsonl_catalog[0]), str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert visible == ["train-000000.tar", "train-000000.tar.idx"]  # complete; no dataset.json
    import tarfile
    with tarfile.open(out / "train-000000.tar") as tar:
        assert len(tar.getnames()) == 3 * len(COMPONENTS)
    with pytest.raises(FileNotFoundError):
        load_dataset_info(out)
    write_shards(jsonl_catalog[0], TASKS, out, val_fraction=0.0, samples_per_shard=3, overwrite=True)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # the staging leftovers are gone
    assert load_dataset_info(out).num_samples("train") > 0


def test_unlabelled_catalogue_for_prediction(tmp_path, fashion_shards):
    """`--unlabelled`: rows without labels are kept (a catalogue to predict), with the classes of
    --vocab-from, which it needs."""
    image = "images/" + sorted((FASHION_DIR / "images").glob("*.jpg"))[0].name
    rows = [{"id": "new-1", "image": image, "text": "Blue shirt"}, {"id": "new-2", "text": "Red shoe"},
            {"id": "new-3", "image": image, "text": "Green cap", "labels": {"usage": "Casual"}}]
    catalogue = tmp_path / "tonight.jsonl"
    catalogue.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    with pytest.raises(ValueError, match="'gender' appear in no row's labels"):  # labels required by default
        write_shards(catalogue, ["usage", "gender"], tmp_path / "labelled", vocab_from=fashion_shards,
                     val_fraction=0.0, image_root=FASHION_DIR)
    with pytest.raises(shards_module.ShardsError, match="needs --vocab-from"):
        write_shards(catalogue, ["usage", "gender"], tmp_path / "no-vocab", unlabelled=True, val_fraction=0.0,
                     image_root=FASHION_DIR)
    dataset = write_shards(catalogue, ["usage", "gender"], tmp_path / "out", vocab_from=fashion_shards,
                           val_fraction=0.0, unlabelled=True, image_root=FASHION_DIR)
    assert dataset["splits"]["train"]["samples"] == 3 and dataset["skipped"] == []
    samples = sorted(read_webdataset(tmp_path / "out", "train"), key=lambda s: s["id"])
    usage = load_dataset_info(fashion_shards).tasks["usage"].index("Casual")
    assert [list(decode_int32(s["lbl"])) for s in samples] == [[-1, -1], [-1, -1], [usage, -1]]
