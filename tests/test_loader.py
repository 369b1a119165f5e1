"""The input pipelines (cmaclip/data/loader.py, dali.py, pil.py) against the batch contract (data/batch.py).

Ranks are simulated in one process: loaders built with rank=0/1, world_size=2 over shards written
by `write_shards` from the repository's sample photos (some cropped to non-square shapes, one
product text-only). Both backends run every test they apply to; DALI tests skip without DALI.
"""
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cmaclip.data.batch import HOST_FACTS, rank_share
from cmaclip.data.config import DataConfig
from cmaclip.data.format import attention_mask_from_tokens, decode_int32, load_dataset_info
from cmaclip.data.loader import build_loader, resolve_backend
from cmaclip.data import pil
from cmaclip.data.pil import preprocess_image
from cmaclip.data.shards import write_shards

PHOTOS = Path(__file__).resolve().parents[1] / "shards" / "fashion-products" / "images"
TRAIN_SAMPLES, VAL_SAMPLES = 23, 7  # 5 samples per tar: train tars of 5,5,5,5,3
COLOURS = ("red", "green", "blue")
TEXT_ONLY_ID = "p7"

dali_param = pytest.param("dali", marks=pytest.mark.skipif(
    resolve_backend("auto") != "dali", reason="nvidia.dali is not installed"))
BACKENDS = [dali_param, "pil"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("loader")
    photos = sorted(PHOTOS.glob("*.jpg"))[: TRAIN_SAMPLES + VAL_SAMPLES]
    rows = []
    for number, photo in enumerate(photos):
        image = Image.open(photo)
        if number % 3 == 1:  # landscape and portrait shapes exercise resize + centre crop
            image = image.crop((0, 40, 224, 184) if number % 2 else (30, 0, 170, 224))
        image.save(root / f"{number}.jpg", quality=90)
        rows.append({"id": f"p{number}", "image": "" if f"p{number}" == TEXT_ONLY_ID else f"{number}.jpg",
                     "text": f"product {number} in {COLOURS[number % 3]}",
                     "labels": {"colour": COLOURS[number % 3]},
                     "split": "train" if number < TRAIN_SAMPLES else "val"})
    (root / "catalog.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    write_shards(root / "catalog.jsonl", ["colour"], root / "shards", samples_per_shard=5)
    return root / "shards"


def product_numbers(shards, split):
    """Product number (the N of id pN) of each sample index: the writer orders samples by id hash."""
    info = load_dataset_info(shards)
    numbers = {}
    for path in info.shard_paths(split):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".id"):
                    sample = int(decode_int32(tar.extractfile(member.name.replace(".id", ".idx")).read())[0])
                    numbers[sample] = int(tar.extractfile(member).read().decode()[1:])
    return [numbers[i] for i in range(len(numbers))]


def make_loader(shards, backend, split="train", *, train=True, rank=0, world_size=1, batch_size=3,
                image_size=32, seed=0, **config):
    return build_loader(shards, split, config=DataConfig(loader=backend, shuffle_buffer=8, **config),
                        batch_size=batch_size, image_size=image_size, train=train, rank=rank,
                        world_size=world_size, seed=seed)


def take(loader, count):
    """The next `count` batches, across epochs, as a training loop would consume them."""
    batches = []
    while len(batches) < count:
        for batch in loader:
            batches.append(batch)
            if len(batches) == count:
                break
    return batches


def real_indices(batch):
    index = batch["index"]
    return index[index >= 0].tolist()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("batch_size", [3, 4, 5])  # rank shares are 11 and 12 samples
def test_ranks_are_disjoint_complete_and_in_step(shards, backend, train, batch_size):
    loaders = [make_loader(shards, backend, train=train, rank=rank, world_size=2, batch_size=batch_size)
               for rank in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == -(-12 // batch_size)
    for epoch in range(3):
        seen = []
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader)
            assert all(len(batch["index"]) == batch_size for batch in batches)
            seen += [i for batch in batches for i in real_indices(batch)]
        assert sorted(seen) == list(range(TRAIN_SAMPLES)), f"epoch {epoch}"
        assert all(loader.epoch == epoch + 1 for loader in loaders)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_follow_the_contract(shards, backend):
    info = load_dataset_info(shards)
    batches = list(make_loader(shards, backend, "val", train=False, batch_size=4, image_size=48))
    batch = batches[0]
    expected = {"pixel_values": (torch.float32, (4, 3, 48, 48)), "input_ids": (torch.int64, (4, 77)),
                "attention_mask": (torch.int64, (4, 77)), "labels": (torch.int64, (4, 1)),
                "modality_mask": (torch.bool, (4, 2)), "index": (torch.int64, (4,)),
                "text_length": (torch.int64, ()), "nothing_masked": (torch.bool, ())}
    assert {key: (value.dtype, tuple(value.shape)) for key, value in batch.items()} == expected
    # eval batches come in shard order, the last one padded
    assert [i for b in batches for i in b["index"].tolist()] == list(range(VAL_SAMPLES)) + [-1]
    assert torch.equal(batch["attention_mask"],
                       torch.from_numpy(attention_mask_from_tokens(batch["input_ids"].numpy())))
    for each in batches:  # the facts the model would otherwise read from the device
        lengths = each["attention_mask"].sum(1)
        assert each["text_length"] == lengths.max()
        assert bool(each["nothing_masked"]) == bool((lengths == lengths.max()).all() and each["modality_mask"].all())
    numbers = product_numbers(shards, "val")
    labels = [info.tasks["colour"].index(COLOURS[numbers[i] % 3]) for i in range(4)]
    assert batch["labels"][:, 0].tolist() == labels
    assert batch["modality_mask"].all()
    # the eval image is exactly what predict/explain's preprocess_image makes of the photo
    photo_pixels = preprocess_image(Image.open(shards.parent / f"{numbers[0]}.jpg"), 48)
    assert photo_pixels.shape == (3, 48, 48)
    if backend == "pil":
        assert torch.equal(batch["pixel_values"][0], photo_pixels)
    else:
        assert (batch["pixel_values"][0] - photo_pixels).abs().mean() < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_text_only_product_is_marked(shards, backend):
    numbers = product_numbers(shards, "train")
    modalities = {numbers[i]: mask for batch in make_loader(shards, backend, train=False, batch_size=8)
                  for i, mask in zip(real_indices(batch), batch["modality_mask"].tolist())}
    assert len(modalities) == TRAIN_SAMPLES
    assert all(mask == ([True, False] if f"p{n}" == TEXT_ONLY_ID else [True, True])
               for n, mask in modalities.items())


def test_attention_mask_runs_to_the_first_eot_or_the_whole_row():
    tokens = np.array([[49406, 5, 6, 49407, 0, 0], [49406, 49407, 0, 0, 0, 0], [49406, 1, 2, 3, 4, 5]])
    assert attention_mask_from_tokens(tokens).tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6]


@pytest.mark.skipif(resolve_backend("auto") != "dali", reason="nvidia.dali is not installed")
def test_dali_and_pil_eval_batches_agree(shards):
    """Same ids, tokens, labels, masks; images (photos of 224 x 224/144/140 px -> 48 px: resize
    + centre crop) within 0.005 mean and 0.2 max absolute difference in CLIP-normalized units
    (one 8-bit level is about 0.015)."""
    for rank in range(2):
        dali, pil = (list(make_loader(shards, backend, train=False, rank=rank, world_size=2,
                                      batch_size=3, image_size=48)) for backend in ("dali", "pil"))
        assert len(dali) == len(pil) == 4
        for a, b in zip(dali, pil):
            for key in ("index", "input_ids", "attention_mask", "labels", "modality_mask"):
                assert torch.equal(a[key], b[key]), key
            difference = (a["pixel_values"] - b["pixel_values"]).abs()
            assert difference.mean() < 0.005 and difference.max() < 0.2


@dali_param.marks[0]
def test_dali_training_crops_finished_by_torch_match_dalis_own_resize(shards):
    """On CPU the crops leave DALI unresized (dali.finish_crops): same windows and flips as DALI's
    resize + crop_mirror_normalize (the GPU path), pixels within a fraction of an 8-bit level on
    average (the two antialiasing filters differ by a few levels at some edges)."""
    on_host = make_loader(shards, "dali", batch_size=4, image_size=32, seed=3)
    in_dali = make_loader(shards, "dali", batch_size=4, image_size=32, seed=3)
    in_dali.crops_on_host = False
    for a, b in zip(take(on_host, 12), take(in_dali, 12), strict=True):
        assert torch.equal(a["index"], b["index"])
        difference = (a["pixel_values"] - b["pixel_values"]).abs()
        assert difference.mean() < 0.005 and difference.max() < 0.5


@dali_param.marks[0]
def test_dali_batch_buffers_are_reused_only_once_let_go():
    from cmaclip.data.dali import BatchBuffers
    buffers, shape = BatchBuffers(keep=2), (2, 3, 4, 4)
    first, second = buffers.take(shape), buffers.take(shape)
    pooled = [array.ctypes.data for array in buffers.arrays]
    assert [first.data_ptr(), second.data_ptr()] == pooled
    view = first[0]  # the first batch is still seen through a view
    del first, second
    again = buffers.take(shape)
    assert again.data_ptr() == pooled[1]
    assert buffers.take(shape).data_ptr() not in pooled  # both held: a new, unpooled buffer
    del view, again
    assert buffers.take(shape).data_ptr() == pooled[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stop_after", [2, 4, 9], ids=["mid-epoch", "epoch-end", "second-epoch"])
def test_resumed_loader_continues_like_an_uninterrupted_one(shards, backend, stop_after):
    arguments = dict(rank=1, world_size=2, batch_size=3)  # 4 batches per epoch
    uninterrupted = take(make_loader(shards, backend, **arguments), stop_after + 6)

    interrupted = make_loader(shards, backend, **arguments)
    take(interrupted, stop_after)
    state = json.loads(json.dumps(interrupted.state_dict()))
    assert len(json.dumps(state)) < 4096
    del interrupted
    resumed = make_loader(shards, backend, **arguments)
    resumed.load_state_dict(state)
    for expected, got in zip(uninterrupted[stop_after:], take(resumed, 6), strict=True):
        for key in expected:
            assert torch.equal(expected[key], got[key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_refuses_a_different_world_size(shards, backend):
    state = make_loader(shards, backend, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size: saved 2, now 1"):
        make_loader(shards, backend, world_size=1).load_state_dict(state)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("legs", [((2, 2), (1, 1), (1, 1), (2, None)), ((1, 3), (2, None))], ids=["2-1-1-2", "1-2"])
def test_elastic_resume_covers_the_epoch_exactly_once(shards, backend, train, legs):
    """Each leg: `world` ranks take `batches` batches each (None: the rest of the epoch) and save;
    the next leg resumes those states on its own world size (elastically when it differs). Every
    sample of the epoch is read exactly once over all legs, ranks stay in step, and the next epoch
    follows the normal rule."""
    seen, states = [], None
    for world, batches in legs:
        loaders = [make_loader(shards, backend, train=train, rank=rank, world_size=world) for rank in range(world)]
        for rank, loader in enumerate(loaders):
            if states is not None and len(states) == world:
                loader.load_state_dict(states[rank])
            elif states is not None:
                loader.load_elastic_state(states)
        assert len({len(loader) for loader in loaders}) == 1
        for loader in loaders:
            taken = list(loader) if batches is None else take(loader, batches)
            seen += [i for batch in taken for i in real_indices(batch)]
        states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]
    assert sorted(seen) == list(range(TRAIN_SAMPLES))
    assert all(loader.epoch == 1 for loader in loaders)
    next_epoch = [i for loader in loaders for batch in loader for i in real_indices(batch)]
    assert sorted(next_epoch) == list(range(TRAIN_SAMPLES))


@pytest.mark.parametrize("backend", BACKENDS)
def test_elastic_resume_refuses_states_from_before_it_existed(shards, backend):
    loaders = [make_loader(shards, backend, rank=rank, world_size=2) for rank in range(2)]
    states = [{key: value for key, value in loader.state_dict().items() if key != "consumed"} for loader in loaders]
    with pytest.raises(ValueError, match="predate elastic resume; resume with the 2 processes"):
        make_loader(shards, backend).load_elastic_state(states)


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_order_and_crops_change_every_epoch(shards, backend):
    loader = make_loader(shards, backend, batch_size=TRAIN_SAMPLES, crop_min_scale=0.5)
    epochs = [list(loader)[0] for _ in range(2)]
    orders = [batch["index"].tolist() for batch in epochs]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(TRAIN_SAMPLES))
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])
    by_sample = [dict(zip(batch["index"].tolist(), batch["pixel_values"])) for batch in epochs]
    assert not torch.equal(by_sample[0][0], by_sample[1][0])  # a new crop of the same photo


def test_pil_workers_do_not_change_the_batches(shards):
    single, parallel = (list(make_loader(shards, "pil", rank=1, world_size=2, workers=workers))
                        for workers in (0, 2))
    for a, b in zip(single, parallel, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_pil_skips_an_unreadable_sample_with_one_warning(shards, tmp_path, caplog):
    broken = tmp_path / "shards"
    broken.mkdir()
    for path in shards.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    # overwrite the JPEG payloads of samples 0 and 1 (same sizes) with garbage
    index_lines = (broken / "train-000000.tar.idx").read_text().splitlines()
    with open(broken / "train-000000.tar", "r+b") as tar:
        for line in index_lines[1:3]:
            fields = line.split()
            tar.seek(int(fields[1]))
            tar.write(b"\xff" * int(fields[2]))
    with caplog.at_level(logging.WARNING, logger="cmaclip.data.pil"):
        batches = list(make_loader(broken, "pil", train=False, batch_size=4, workers=0))
    assert [i for b in batches for i in real_indices(b)] == list(range(2, TRAIN_SAMPLES))
    first = batches[0]
    assert not first["modality_mask"][:2].any() and (first["labels"][:2] == -1).all()
    warnings = [r.getMessage() for r in caplog.records if "unreadable sample" in r.getMessage()]
    assert len(warnings) == 1 and "train-000000.tar sample 0" in warnings[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_ranks_than_samples_is_refused(shards, backend):
    with pytest.raises(ValueError, match="split 'val' has 7 samples, fewer than the 8 ranks"):
        make_loader(shards, backend, "val", world_size=8)


def test_pil_reads_right_with_few_open_shard_files(shards, monkeypatch):
    expected = list(make_loader(shards, "pil", workers=0))
    monkeypatch.setattr(pil, "MAX_OPEN_SHARDS", 2)  # the shuffled order hops between 5 tars
    for a, b in zip(expected, make_loader(shards, "pil", workers=0), strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)


def test_rank_share_matches_the_dali_reader_split():
    # DALI: part p = floor(p*N/W) .. floor((p+1)*N/W), rank r reads part (r + epoch) % W
    assert [rank_share(10, r, 3, 0) for r in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    assert rank_share(10, 0, 3, 1) == range(3, 6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="data.loader"):
        DataConfig(loader="opencv")
    with pytest.raises(ValueError, match="data.crop_min_scale"):
        DataConfig(crop_min_scale=0.0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_land_on_the_gpu(shards, backend):
    loader = build_loader(shards, "val", config=DataConfig(loader=backend), batch_size=4,
                          image_size=32, train=False, device="cuda")
    cpu = build_loader(shards, "val", config=DataConfig(loader=backend), batch_size=4,
                       image_size=32, train=False)
    for on_gpu, on_cpu in zip(loader, cpu, strict=True):
        assert all(on_gpu[key].device.type == "cuda" for key in on_gpu if key not in HOST_FACTS)
        assert all(on_gpu[key].device.type == "cpu" for key in HOST_FACTS)
        assert torch.equal(on_gpu["index"].cpu(), on_cpu["index"])
        assert (on_gpu["pixel_values"].cpu() - on_cpu["pixel_values"]).abs().mean() < 0.01


@pytest.mark.parametrize("backend", BACKENDS)
def test_batches_stay_intact_while_the_loader_runs_on(shards, backend):
    """DALI's outputs are shared with torch, not copied: later runs must not overwrite them."""
    loader = make_loader(shards, backend, batch_size=4)
    kept, copies = [], []
    for _ in range(3):  # 18 batches, well past DALI's prefetch queue
        for batch in loader:
            kept.append(batch)
            copies.append({key: value.clone() for key, value in batch.items()})
    for batch, copy in zip(kept, copies):
        assert all(torch.equal(batch[key], copy[key]) for key in batch)
