"""CMAClip on the tiny preset: shapes, masking, missing modalities and labels, save/load, presets."""
import json

import pytest
import torch

from cmaclip.model import FUSIONS, CMAClip, ModelConfig
from cmaclip.model.cmaclip import drop_one_modality, drop_title_tokens

TASKS = {"color": ["red", "blue", "green"], "season": ["summer", "winter"]}
SOT, EOT = 49406, 49407


def make_batch(lengths, context_length=77, image_size=64, seed=0):
    """Token ids [SOT, words, EOT, 0...] of the given word counts, random images, both present."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    input_ids = torch.zeros(batch, context_length, dtype=torch.long)
    for row, words in enumerate(lengths):
        input_ids[row, 0] = SOT
        input_ids[row, 1:1 + words] = torch.randint(300, 40000, (words,), generator=generator)
        input_ids[row, 1 + words] = EOT
    attention_mask = (torch.arange(context_length)[None, :] <= torch.tensor(lengths)[:, None] + 1).long()
    return {
        "pixel_values": torch.randn(batch, 3, image_size, image_size, generator=generator),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "modality_mask": torch.ones(batch, 2, dtype=torch.bool),
    }


def tiny(fusion="cma", **overrides):
    torch.manual_seed(0)
    return CMAClip(ModelConfig(preset="tiny", fusion=fusion, **overrides), TASKS).eval()


@pytest.fixture(scope="module")
def cma(untrained_fusion):
    """A cma model whose fusion layers are not the identity (as they are when built)."""
    return untrained_fusion(tiny())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_variant_gives_logits_weights_and_a_loss_every_parameter_trains(fusion):
    model = tiny(fusion).train()
    batch = make_batch([3, 7, 1, 12])
    out = model(**batch, labels=torch.tensor([[0, 1], [2, -1], [-1, 0], [1, 1]]))
    assert out.logits["color"].shape == (4, 3) and out.logits["season"].shape == (4, 2)
    assert out.modality_weights.shape == (4, 2, 2)
    assert set(out.task_losses) == set(TASKS) and torch.isfinite(out.loss)
    out.loss.backward()
    # unused parameters would stall DDP / DeepSpeed: a variant builds only what it uses
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    assert all(p.dim() > 0 for p in model.parameters()), "0-dim parameters break DeepSpeed"


def test_tiny_model_learns_a_small_batch():
    model = tiny().train()
    batch = make_batch([3, 5, 8, 2, 6, 4, 9, 1])
    labels = torch.tensor([[0, 1], [1, 0], [2, 1], [0, 0], [1, 1], [2, 0], [0, 1], [1, 0]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


def test_modules_a_variant_does_not_use_are_not_built():
    assert tiny("image").backbone.text_model is None
    assert tiny("text").backbone.vision_model is None
    assert tiny("concat").sequence_attention is None
    assert tiny("cma-no-modality").modality_attention is None


def test_attentions_cover_the_trimmed_sequence(cma):
    out = cma(**make_batch([3, 9]), return_attentions=True)
    text_length = 11  # SOT + 9 words + EOT
    assert out.text_length == text_length
    assert [a.shape for a in out.attentions] == [(2, 8, text_length + 65, text_length + 65)] * 2
    fused = cma(**make_batch([3, 9]))
    assert (fused.logits["color"] - out.logits["color"]).abs().max() < 1e-5


def test_outputs_do_not_depend_on_padding(cma):
    alone = make_batch([4], seed=1)
    short = {key: value[:, :20] if value.shape[-1] == 77 else value for key, value in alone.items()}
    # the same sample batched with a much longer text gets 20 more masked text positions
    with_long = make_batch([4, 30], seed=1)
    with_long = {key: torch.cat([alone[key], value[1:]]) for key, value in with_long.items()}
    with torch.no_grad():
        reference = cma(**alone)
        for other in (cma(**short), cma(**with_long)):
            for task in TASKS:
                assert (other.logits[task][0] - reference.logits[task][0]).abs().max() < 1e-5
            assert (other.modality_weights[0] - reference.modality_weights[0]).abs().max() < 1e-6


def test_modality_weights_sum_to_one_over_present_modalities():
    cma = tiny()
    batch = make_batch([3, 5, 8, 2])
    batch["modality_mask"] = torch.tensor([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    cma.modality_attention.task_vectors.data.normal_()  # non-trivial weights, not the init's 0.5
    weights = cma(**batch).modality_weights
    assert torch.all((weights >= 0) & (weights <= 1))
    assert torch.allclose(weights[:3].sum(-1), torch.ones(3, 2))
    assert not torch.allclose(weights[0], torch.full((2, 2), 0.5))
    assert torch.equal(weights[1, :, 1], torch.zeros(2)) and torch.equal(weights[2, :, 0], torch.zeros(2))
    assert torch.equal(weights[3], torch.zeros(2, 2))  # nothing present: no weights, no NaN


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_missing_modality_does_not_influence_the_prediction(fusion, untrained_fusion):
    model = untrained_fusion(tiny(fusion))
    batch = make_batch([5, 5])
    batch["modality_mask"] = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)  # no image / no text
    changed = {key: value.clone() for key, value in batch.items()}
    changed["pixel_values"][0] = torch.randn(3, 64, 64)
    changed["input_ids"][1, 1:6] = torch.randint(300, 40000, (5,))
    with torch.no_grad():
        out, out_changed = model(**batch), model(**changed)
    for task in TASKS:
        assert torch.isfinite(out.logits[task]).all()
        assert (out.logits[task] - out_changed.logits[task]).abs().max() < 1e-5
    expected_text_weight = {"image": [0.0, 0.0], "text": [1.0, 0.0]}.get(fusion, [1.0, 0.0])
    assert out.modality_weights[:, 0, 0].tolist() == expected_text_weight


def test_missing_labels_contribute_nothing_to_loss_or_gradient():
    model = tiny(label_smoothing=0.1)  # smoothing spreads loss over classes: it too must be masked
    out = model(**make_batch([3, 4, 5]))
    labels = torch.tensor([[0, -1], [-1, -1], [2, -1]])  # season has no label at all
    logits = {task: value.detach().requires_grad_() for task, value in out.logits.items()}
    loss, task_losses = model.loss(logits, labels)
    loss.backward()
    assert task_losses["season"] == 0 and torch.isfinite(loss)
    assert torch.equal(logits["season"].grad, torch.zeros(3, 2))
    assert torch.equal(logits["color"].grad[1], torch.zeros(3))
    expected = torch.nn.functional.cross_entropy(logits["color"][[0, 2]], torch.tensor([0, 2]), label_smoothing=0.1)
    assert torch.allclose(loss, expected)


def test_task_weights_and_label_smoothing_enter_the_loss():
    model = tiny(task_weights={"season": 3.0}, label_smoothing=0.1)
    logits = {"color": torch.randn(2, 3), "season": torch.randn(2, 2)}
    labels = torch.tensor([[0, 1], [1, 0]])
    loss, task_losses = model.loss(logits, labels)
    smoothed = torch.nn.functional.cross_entropy(logits["season"], labels[:, 1], label_smoothing=0.1)
    assert torch.allclose(task_losses["season"], smoothed)
    assert torch.allclose(loss, task_losses["color"] + 3.0 * task_losses["season"])


def test_heads_read_the_weighted_sum_of_eot_and_cls_taken_from_the_attended_sequence(cma):
    """Head input of task k = w_k,text * T'[EOT] + w_k,image * I'[CLS], both read from the sequence
    attention's output at the EOT and the image [CLS] positions."""
    batch = make_batch([3, 9])
    seen = {}
    hooks = [cma.sequence_attention.register_forward_hook(lambda m, i, out: seen.__setitem__("sequence", out[0])),
             cma.backbone.text_projection.register_forward_hook(lambda m, i, out: seen.__setitem__("T", out)),
             cma.backbone.visual_projection.register_forward_hook(lambda m, i, out: seen.__setitem__("I", out))]
    for k, head in enumerate(cma.heads):
        hooks.append(head.register_forward_pre_hook(lambda m, args, key=("fused", k): seen.__setitem__(key, args[0])))
    task_vectors = cma.modality_attention.task_vectors
    original = task_vectors.detach().clone()
    with torch.no_grad():
        task_vectors.normal_(0, 0.5)  # task-specific weights, not the init's plain mean
        out = cma(**batch)
        task_vectors.copy_(original)
    for hook in hooks:
        hook.remove()
    eot = batch["attention_mask"].sum(dim=1) - 1
    text = seen["sequence"][torch.arange(2), eot]
    image = seen["sequence"][:, out.text_length]
    weights = out.modality_weights
    assert (weights - 0.5).abs().min() > 0.01
    for k in range(len(TASKS)):
        expected = weights[:, k, :1] * text + weights[:, k, 1:] * image
        torch.testing.assert_close(seen[("fused", k)], expected)


def test_eot_and_cls_embeddings_are_clips_own_text_and_image_features():
    from transformers import CLIPModel

    model = tiny("concat")
    clip = CLIPModel(model.backbone.clip_config).eval()
    backbone = model.backbone
    clip.text_model.load_state_dict(backbone.text_model.state_dict())
    clip.vision_model.load_state_dict(backbone.vision_model.state_dict())
    clip.text_projection.load_state_dict(backbone.text_projection.state_dict())
    clip.visual_projection.load_state_dict(backbone.visual_projection.state_dict())
    batch = make_batch([3, 9, 1])
    seen = {}
    model.heads[0].register_forward_pre_hook(lambda m, args: seen.__setitem__("input", args[0]))
    with torch.no_grad():
        model(**batch)
        text = clip.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        image = clip.get_image_features(pixel_values=batch["pixel_values"])
    # transformers 5 returns the model output with the projected embedding as its pooler_output
    text, image = (getattr(features, "pooler_output", features) for features in (text, image))
    width = backbone.width
    torch.testing.assert_close(seen["input"][:, :width], text)
    torch.testing.assert_close(seen["input"][:, width:], image)


def test_each_modality_alone_learns_from_the_samples_that_have_it():
    model = tiny(unimodal_loss_weight=0.5, noisy_title_loss_weight=0, dropout=0.0).train()
    batch = make_batch([3, 5, 8])
    batch["modality_mask"] = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    labels = torch.tensor([[0, 1], [2, 0], [1, -1]])
    out = model(**batch, labels=labels)
    assert set(out.unimodal_logits) == {"text", "image"}
    expected, _ = model.loss(out.logits, labels)
    for name, rows in (("text", [0, 1]), ("image", [0, 2])):
        alone, _ = model.loss({task: value[rows] for task, value in out.unimodal_logits[name].items()}, labels[rows])
        expected = expected + 0.5 * alone
    torch.testing.assert_close(out.loss, expected)
    model.eval()
    assert model(**batch).unimodal_logits == {}  # prediction does not pay for them
    assert set(model(**batch, unimodal=True).unimodal_logits) == {"text", "image"}  # evaluation does
    for without in (tiny(unimodal_loss_weight=0).train(), tiny("text").train()):
        assert without(**batch, labels=labels).unimodal_logits == {}


@pytest.mark.parametrize("fusion", ["cma", "cma-no-modality", "concat"])
def test_each_modality_alone_is_the_prediction_a_product_with_that_modality_only_gets(fusion, untrained_fusion):
    """The auxiliary loss trains exactly the model that answers a product without a photo or a
    title: the text-alone prediction of a full product equals the model's prediction for the same
    product with its image masked, and the image-alone one with its text masked."""
    model = untrained_fusion(tiny(fusion))
    if model.modality_attention is not None:
        model.modality_attention.task_vectors.data.normal_()
    both = make_batch([3, 7])
    masked = {name: {**both, "modality_mask": torch.tensor([keep, keep], dtype=torch.bool)}
              for name, keep in (("text", [1, 0]), ("image", [0, 1]))}
    with torch.no_grad():
        alone = model(**both, unimodal=True).unimodal_logits
        fused = model(**both).logits
        for name in ("text", "image"):
            answered = model(**masked[name]).logits
            for task in TASKS:
                torch.testing.assert_close(alone[name][task], answered[task])
                assert not torch.allclose(alone[name][task], fused[task], atol=1e-4)


def drop_first_word(input_ids, attention_mask, max_rate):
    """A scripted noisy copy: each title loses its first word (SOT, w1, w2, EOT -> SOT, w2, EOT)."""
    length = attention_mask.sum(dim=1, keepdim=True)
    ids = torch.cat([input_ids[:, :1], input_ids[:, 2:], torch.zeros_like(input_ids[:, :1])], dim=1)
    mask = (torch.arange(input_ids.shape[1]) < length - 1).long()
    return ids * mask, mask


def test_noisy_titles_join_the_loss_over_the_samples_with_a_title(monkeypatch):
    """The noisy-title pass is the fused prediction for the same products with the noisy titles,
    its loss weighted, over the samples that have a title (the image-only one has nothing to damage)."""
    monkeypatch.setattr("cmaclip.model.cmaclip.drop_title_tokens", drop_first_word)
    model = tiny(noisy_title_loss_weight=0.5, unimodal_loss_weight=0, dropout=0.0).train()
    batch = make_batch([3, 5, 8])
    batch["modality_mask"] = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.bool)
    labels = torch.tensor([[0, 1], [2, 0], [1, -1]])
    out = model(**batch, labels=labels)
    noisy_ids, noisy_mask = drop_first_word(batch["input_ids"], batch["attention_mask"], 0.5)
    noisy = model.eval()(**{**batch, "input_ids": noisy_ids, "attention_mask": noisy_mask}).logits
    with_title = [0, 1]
    expected = model.loss(out.logits, labels)[0] + 0.5 * model.loss(
        {task: value[with_title] for task, value in noisy.items()}, labels[with_title])[0]
    torch.testing.assert_close(out.loss, expected)


def test_the_noisy_title_pass_trains_the_fusion_not_the_encoders(untrained_fusion):
    """Its gradients reach the fusion (sequence and modality attention, heads) only: the encoders
    learn from clean titles as without it. Prediction does not run it."""
    batch, labels = make_batch([3, 5, 8, 2]), torch.tensor([[0, 1], [2, 0], [1, 1], [0, 0]])
    gradients = {}
    for weight in (0.0, 1.0):
        model = untrained_fusion(tiny(noisy_title_loss_weight=weight, unimodal_loss_weight=0, dropout=0.0)).train()
        model.modality_attention.task_vectors.data.normal_()
        torch.manual_seed(1)
        model(**batch, labels=labels).loss.backward()
        gradients[weight] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, without in gradients[0.0].items():
        same = torch.allclose(gradients[1.0][name], without)
        assert same == name.startswith("backbone."), name
    calls = []
    model.backbone.encode_text = lambda ids, encode=model.backbone.encode_text: calls.append(ids) or encode(ids)
    model.eval()(**batch)
    assert len(calls) == 1
    model.train()(**batch)
    assert len(calls) == 3 and not torch.equal(calls[1], calls[2])  # the clean titles, then the noisy ones


def test_drop_title_tokens_keeps_sot_eot_and_the_order_of_what_it_keeps():
    torch.manual_seed(0)
    batch = make_batch([12] * 400 + [0])
    ids, mask = drop_title_tokens(batch["input_ids"], batch["attention_mask"], 0.5)
    assert ids.shape == batch["input_ids"].shape and mask.shape == batch["attention_mask"].shape
    lengths = mask.sum(dim=1)
    assert torch.equal(ids[:, 0], batch["input_ids"][:, 0])  # SOT
    assert torch.equal(ids[torch.arange(len(ids)), lengths - 1], torch.full((len(ids),), EOT))
    assert torch.equal(ids * (1 - mask), torch.zeros_like(ids))  # padding behind
    for row in range(400):
        title = iter(batch["input_ids"][row, 1:13].tolist())
        assert all(token in title for token in ids[row, 1:lengths[row] - 1].tolist())  # a subsequence, in order
    dropped = 1 - (lengths[:400] - 2).float() / 12
    assert 0.2 < dropped.mean() < 0.3 and dropped.max() > 0.4  # rates ~ U(0, 0.5): 0.25 on average
    assert torch.equal(ids[400], batch["input_ids"][400])  # an empty title stays empty
    same, same_mask = drop_title_tokens(batch["input_ids"], batch["attention_mask"], 0.0)
    assert torch.equal(same, batch["input_ids"]) and torch.equal(same_mask, batch["attention_mask"])


def test_modality_dropout_is_applied_in_training():
    model = tiny(modality_dropout=0.99).train()
    weights = model(**make_batch([3] * 16)).modality_weights[:, 0]  # [B, 2] of the first task
    assert (weights.max(dim=-1).values == 1).float().mean() > 0.8  # one modality left per sample


def test_modality_dropout_drops_one_modality_never_both():
    torch.manual_seed(0)
    present = torch.tensor([[1, 1]] * 1000 + [[1, 0], [0, 1]], dtype=torch.bool)
    dropped = drop_one_modality(present, 0.999)
    assert torch.all(dropped.sum(-1) >= 1)
    assert dropped[:1000].sum(-1).eq(1).float().mean() > 0.99
    assert 0.4 < dropped[:1000, 0].float().mean() < 0.6  # text and image equally likely
    assert torch.equal(dropped[1000:], present[1000:])
    model = tiny(modality_dropout=0.999)  # eval mode: no dropout
    assert torch.equal(model(**make_batch([3, 3])).modality_weights, torch.full((2, 2, 2), 0.5))


def test_save_and_load_give_identical_logits_without_the_hub(cma, tmp_path):
    batch = make_batch([3, 9])
    cma.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["tasks"] == TASKS and saved["model"]["image_size"] == 64 and "vision_config" in saved["clip"]
    # a model first built from a hub checkpoint keeps that name: loading must not go back there
    saved["model"]["pretrained"] = "openai/clip-vit-base-patch16"
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = CMAClip.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        before, after = cma(**batch), loaded(**batch)
    for task in TASKS:
        assert torch.equal(before.logits[task], after.logits[task])
    assert loaded.tasks == TASKS and loaded.config.fusion == "cma"


def test_save_pretrained_refuses_a_state_dict_of_another_model(cma, tmp_path):
    with pytest.raises(ValueError, match="unexpected"):
        cma.save_pretrained(tmp_path, state_dict={("module." + k): v for k, v in cma.state_dict().items()})


def test_models_saved_in_formats_1_and_2_load_and_an_unknown_format_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    old = tiny(unimodal_loss_weight=0)  # format 1 had no auxiliary loss and no key for it
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["model"]["unimodal_loss_weight"]
    (tmp_path / "config.json").write_text(json.dumps({**saved, "format_version": 1}))
    loaded = CMAClip.from_pretrained(tmp_path).eval()
    batch = make_batch([3, 4])
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits["color"], old(**batch).logits["color"])
    # format 2: separate unimodal heads (dropped on load) and their `unimodal_when_missing` key
    version2 = tiny()
    version2.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    weights["unimodal_heads.text.0.net.1.weight"] = torch.zeros(4, 4)
    save_file(weights, str(tmp_path / "model.safetensors"))
    saved = json.loads((tmp_path / "config.json").read_text())
    saved["model"]["unimodal_when_missing"] = True
    (tmp_path / "config.json").write_text(json.dumps({**saved, "format_version": 2}))
    with torch.no_grad():
        assert torch.equal(CMAClip.from_pretrained(tmp_path).eval()(**batch).logits["color"],
                           version2(**batch).logits["color"])
    (tmp_path / "config.json").write_text(json.dumps({**saved, "format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        CMAClip.from_pretrained(tmp_path)


def test_from_pretrained_names_a_folder_that_is_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        CMAClip.from_pretrained(tmp_path)


# Published parameter counts of openai/clip-vit-*: CLIPModel minus its 0-dim logit_scale.
@pytest.mark.parametrize("preset, clip_parameters, patches", [
    ("vit-b-32", 151_277_313, 49), ("vit-b-16", 149_620_737, 196), ("vit-l-14", 427_616_513, 256)])
def test_big_presets_have_the_published_shapes(preset, clip_parameters, patches):
    with torch.device("meta"):  # shapes only, no memory
        model = CMAClip(ModelConfig(preset=preset), TASKS)
    assert sum(p.numel() for p in model.backbone.parameters()) == clip_parameters - 1
    assert model.config.image_size == 224 and model.config.context_length == 77
    assert model.backbone.vision_model.embeddings.num_patches == patches


def test_pretrained_loads_a_local_clip_folder_and_interpolates_a_new_image_size(tmp_path):
    from transformers import CLIPModel

    from cmaclip.model.config import preset_clip_config

    clip = CLIPModel(preset_clip_config(ModelConfig(preset="tiny")))
    clip.save_pretrained(tmp_path)
    model = CMAClip(ModelConfig(pretrained=str(tmp_path), image_size=32), TASKS).eval()
    assert torch.equal(model.backbone.visual_projection.weight, clip.visual_projection.weight)
    assert torch.equal(model.backbone.text_model.embeddings.token_embedding.weight,
                       clip.text_model.embeddings.token_embedding.weight)
    out = model(**make_batch([3, 5], image_size=32))  # 64 px position table, interpolated to 32 px
    assert torch.isfinite(out.logits["color"]).all() and model.config.image_size == 32


def test_bfloat16_model_runs_and_reports_float32_weights():
    model = tiny().to(torch.bfloat16)
    batch = make_batch([3, 5])
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    batch["modality_mask"][1, 1] = False
    out = model(**batch, labels=torch.tensor([[0, 1], [1, -1]]))
    assert torch.isfinite(out.loss) and out.modality_weights.dtype == torch.float32
    assert out.modality_weights[1, :, 1].tolist() == [0.0, 0.0]


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="model.fusion"):
        CMAClip(ModelConfig(fusion="late"), TASKS)
    with pytest.raises(ValueError, match="model.preset"):
        CMAClip(ModelConfig(preset="vit-h-14"), TASKS)
    with pytest.raises(ValueError, match="model.task_weights"):
        CMAClip(ModelConfig(task_weights={"colour": 2.0}), TASKS)
    with pytest.raises(ValueError, match="model.fusion_heads"):
        CMAClip(ModelConfig(fusion_heads=3), TASKS)
    with pytest.raises(ValueError, match="model.image_size"):
        CMAClip(ModelConfig(image_size=60), TASKS)


def test_labels_of_the_wrong_shape_are_refused(cma):
    with pytest.raises(ValueError, match="labels must be"):
        cma(**make_batch([3]), labels=torch.tensor([0, 1]))


def test_image_size_override_and_gradient_checkpointing():
    model = tiny(image_size=32, gradient_checkpointing=True).train()
    assert model.config.image_size == 32
    assert model.backbone.vision_model.is_activation_checkpointing and model.sequence_attention.gradient_checkpointing
    out = model(**make_batch([3, 4], image_size=32), labels=torch.tensor([[0, 1], [1, 0]]))
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_host_facts_replace_what_the_model_would_read_from_the_device(cma):
    """The loader's text_length and nothing_masked (counted on the host) spare the model two
    device syncs; given, they are used, and the outputs are those the model computes without them."""
    padded = make_batch([3, 7])
    longer = cma(**padded, text_length=11, nothing_masked=False)  # 9 needed: trimming less is exact
    assert longer.text_length == 11
    torch.testing.assert_close(longer.logits["color"], cma(**padded).logits["color"])
    equal = make_batch([5, 5])
    torch.testing.assert_close(cma(**equal, text_length=7, nothing_masked=True).logits["color"],
                               cma(**equal).logits["color"])
