"""`cmaclip pretrain`: the contrastive losses, their gather across 2 gloo processes (the 2-rank loss
and gradients equal the 1-rank ones at the same global batch), and the command under `accelerate
launch` with DDP, ZeRO-2 and ZeRO-3: it learns, logs retrieval, resumes exactly, and exports a
CLIP folder that transformers and `model.pretrained=` both load."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cmaclip.model.config import ContrastiveConfig, ModelConfig
from cmaclip.model.contrastive import ContrastiveCLIP, clip_loss, siglip_loss
from cmaclip.pretrain import recall_at
from test_train_distributed import environment, free_port, launch, losses

PRETRAIN = dict(module="cmaclip.pretrain", recipe="configs/cpu-pretrain.yaml")
GLOBAL_BATCH = 8
INVALID_ROWS = (1, 5)  # one per rank's half: rows that are not pairs take no part in the loss


def tiny_model(loss: str) -> ContrastiveCLIP:
    torch.manual_seed(0)
    return ContrastiveCLIP(ModelConfig(preset="tiny"), ContrastiveConfig(loss=loss))


def pair_batch() -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 49000, (GLOBAL_BATCH, 77), generator=generator)
    lengths = torch.randint(3, 12, (GLOBAL_BATCH,), generator=generator)
    ids[torch.arange(GLOBAL_BATCH), lengths] = 49407
    ids[:, 0] = 49406
    mask = (torch.arange(77) <= lengths[:, None]).long()
    modality_mask = torch.ones(GLOBAL_BATCH, 2, dtype=torch.bool)
    modality_mask[INVALID_ROWS[0], 0] = modality_mask[INVALID_ROWS[1], 1] = False  # no title / no image
    return dict(pixel_values=torch.randn(GLOBAL_BATCH, 3, 64, 64, generator=generator), input_ids=ids,
                attention_mask=mask, modality_mask=modality_mask)


def loss_and_gradients(model, batch, gather=None) -> tuple[float, dict]:
    output = model(**batch) if gather is None else model(**batch, gather=gather)
    output.loss.backward()
    return output.loss.item(), {name: p.grad.clone() for name, p in model.named_parameters()}


def two_rank_worker(rank: int, port: int, loss: str, results: str) -> None:
    """One rank: its half of the global batch, the gathered loss, then what DDP does (the mean
    of the ranks' losses and gradients)."""
    from cmaclip.distributed import gather_with_grad

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    half = GLOBAL_BATCH // 2
    batch = {key: value[rank * half:(rank + 1) * half] for key, value in pair_batch().items()}
    value, gradients = loss_and_gradients(tiny_model(loss), batch, gather_with_grad)
    summed = torch.tensor([value])
    dist.all_reduce(summed)
    for gradient in gradients.values():
        dist.all_reduce(gradient)
    if rank == 0:
        torch.save({"loss": summed.item() / 2, "gradients": {k: g / 2 for k, g in gradients.items()}}, results)
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_two_ranks_give_the_one_rank_loss_and_gradients(loss, tmp_path):
    results = str(tmp_path / "two_ranks.pt")
    mp.spawn(two_rank_worker, args=(free_port(), loss, results), nprocs=2)
    two = torch.load(results)
    value, gradients = loss_and_gradients(tiny_model(loss), pair_batch())
    assert two["loss"] == pytest.approx(value, rel=1e-5)
    # some gradients are zero up to rounding (a key bias cannot change a softmax): the absolute
    # tolerance follows the largest gradient of the model
    largest = max(gradient.abs().max().item() for gradient in gradients.values())
    for name, gradient in gradients.items():
        torch.testing.assert_close(two["gradients"][name], gradient, rtol=1e-4, atol=1e-6 * largest,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


def test_clip_loss_is_the_symmetric_cross_entropy_over_valid_pairs():
    image = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    valid = torch.tensor([True, True, False, True])
    scale = torch.tensor(10.0)
    kept = valid.nonzero().squeeze(1)
    logits = scale * image[kept] @ text[kept].T
    targets = torch.arange(len(kept))
    expected = (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
    assert clip_loss(image, text, valid, scale).item() == pytest.approx(expected.item(), rel=1e-6)
    # matched features and a large scale: nothing left to learn
    assert clip_loss(image, image, valid, torch.tensor(100.0)).item() < clip_loss(image, text, valid, scale).item()


@pytest.mark.parametrize("loss", [clip_loss, lambda *args: siglip_loss(*args, torch.tensor(-10.0))])
@pytest.mark.parametrize("valid", [[True, False, True], [False, False, False]])
def test_rows_that_are_not_pairs_leave_loss_and_gradients_finite(loss, valid):
    """The loader's padding rows (the last batch of an epoch) and rows missing a modality."""
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    value = loss(image, text, torch.tensor(valid), torch.tensor(100.0))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(image.grad).all() and torch.isfinite(text.grad).all()
    if not any(valid):
        assert value.item() == 0.0 and not image.grad.any()


def test_siglip_loss_counts_every_pair_once():
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    valid = torch.ones(3, dtype=torch.bool)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(3) - 1
    expected = -torch.nn.functional.logsigmoid(labels * logits).sum() / 3
    assert siglip_loss(image, text, valid, scale, bias).item() == pytest.approx(expected.item(), rel=1e-6)


def test_recall_at_k():
    similarity = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.5, 0.0], [0.0, 0.3, 0.2]])
    assert recall_at(similarity, 1) == pytest.approx(1 / 3)
    assert recall_at(similarity, 2) == pytest.approx(1.0)


def test_logit_scale_is_clamped_at_100():
    model = tiny_model("clip")
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    batch = pair_batch()
    assert model(**batch).logit_scale.item() == pytest.approx(100.0)


@pytest.mark.parametrize("fusion", ["cma", "image", "text"])
def test_fine_tuning_starts_from_exactly_the_exported_features(fusion, tmp_path):
    """model.pretrained=<export> gives CMA-CLIP the pretraining model's own pooled features (both
    towers and both projections as exported, nothing re-initialised, at a non-default image size
    so that no position-table interpolation hides in the load)."""
    from cmaclip.model import CMAClip

    torch.manual_seed(0)
    pretrained = ContrastiveCLIP(ModelConfig(preset="tiny", image_size=32), ContrastiveConfig()).eval()
    pretrained.save_pretrained(tmp_path)
    batch = pair_batch()
    batch["pixel_values"] = batch["pixel_values"][..., :32, :32]
    torch.manual_seed(1)  # a re-initialised weight would differ from the export
    model = CMAClip(ModelConfig(pretrained=str(tmp_path), fusion=fusion), {"task": ["a", "b"]}).eval()
    assert model.config.image_size == 32
    with torch.no_grad():
        image, text = pretrained.encode(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        eot = batch["attention_mask"].sum(-1) - 1
        if model.uses_image:
            ours = torch.nn.functional.normalize(model.backbone.encode_image(batch["pixel_values"])[:, 0], dim=-1)
            assert torch.equal(ours, image)
        if model.uses_text:
            states = model.backbone.encode_text(batch["input_ids"])
            ours = torch.nn.functional.normalize(states[torch.arange(len(eot)), eot], dim=-1)
            assert torch.equal(ours, text)


# ---- the command under accelerate launch -------------------------------------------------------------

@pytest.fixture(scope="module")
def pretrain_ddp(fashion_shards, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("pretrain-ddp") / "run"
    stdout = launch("cpu.yaml", fashion_shards, output_dir, "train.eval_every=4", "data.eval_split=val", **PRETRAIN)
    assert "training on 2 process(es)" in stdout and "step 4: retrieval (" in stdout
    return output_dir


@pytest.mark.slow
def test_pretraining_on_two_processes_learns_and_logs_retrieval(pretrain_ddp):
    curve = losses(pretrain_ddp)
    assert sorted(curve) == list(range(1, 9))
    assert (curve[7] + curve[8]) / 2 < (curve[1] + curve[2]) / 2, curve
    temperature = losses(pretrain_ddp, "train/temperature")
    assert temperature[1] == pytest.approx(0.07, rel=0.05)
    for direction in ("image_to_title", "title_to_image"):
        for k in (1, 5):
            recall = losses(pretrain_ddp, f"eval/{direction}_recall@{k}")
            assert set(recall) == {4, 8} and all(0.0 <= value <= 1.0 for value in recall.values())


@pytest.mark.slow
def test_export_loads_as_transformers_clip_and_as_a_cmaclip_backbone(pretrain_ddp, tmp_path):
    exported = pretrain_ddp / "model"
    script = (
        "import torch, transformers\n"
        "from cmaclip.model import CMAClip\n"
        "from cmaclip.model.config import ModelConfig\n"
        f"clip = transformers.CLIPModel.from_pretrained({str(exported)!r})\n"
        f"model = CMAClip(ModelConfig(pretrained={str(exported)!r}, fusion='cma'), {{'task': ['a', 'b']}})\n"
        "ours, theirs = model.backbone.state_dict(), clip.state_dict()\n"
        "assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.items()), 'weights differ'\n"
        "print(len(ours), float(clip.logit_scale))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={**environment(), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    count, logit_scale = done.stdout.split()[-2:]
    assert int(count) > 90 and math.log(1 / 0.08) < float(logit_scale) <= math.log(100)


@pytest.mark.slow
def test_resumed_pretraining_matches_the_uninterrupted_one_bitwise(pretrain_ddp, fashion_shards, tmp_path):
    resumed = tmp_path / "resumed"
    stdout = launch("cpu.yaml", fashion_shards, resumed,
                    f"train.resume={pretrain_ddp / 'checkpoints' / 'step-000000004'}", **PRETRAIN)
    assert "at step 4" in stdout
    original, again = losses(pretrain_ddp), losses(resumed)
    assert sorted(again) == [5, 6, 7, 8]
    assert [again[s] for s in again] == [original[s] for s in again]
    expected = load_file(pretrain_ddp / "model" / "model.safetensors")
    for name, tensor in load_file(resumed / "model" / "model.safetensors").items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_pretraining_matches_ddp(stage, pretrain_ddp, fashion_shards, tmp_path):
    output_dir = tmp_path / stage
    stdout = launch("cpu-deepspeed.yaml", fashion_shards, output_dir, "train.eval_every=4", "data.eval_split=val",
                    launch_flags=("--deepspeed_config_file", f"ds_configs/{stage}.json"), **PRETRAIN)
    assert "DEEPSPEED" in stdout
    assert losses(output_dir) == pytest.approx(losses(pretrain_ddp), rel=1e-4)
    exported, expected = load_file(output_dir / "model" / "model.safetensors"), load_file(
        pretrain_ddp / "model" / "model.safetensors")
    assert exported.keys() == expected.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-3, atol=1e-4, msg=name)
