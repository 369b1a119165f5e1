"""Evaluation: each sample counted once (padding, duplicates, two ranks), perturbations, reporting."""
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from cmaclip import evaluate
from cmaclip.data.format import EOT_TOKEN_ID, SOT_TOKEN_ID, DatasetInfo

TASKS = {"colour": ["red", "blue", "green"], "kind": ["shirt", "shoe"]}
CONTEXT = 8


class ScriptedModel(nn.Module):
    """Predicts what the batch encodes: class of task k = input_ids[:, 1 + k], its confidence =
    pixel_values[:, 0, 0, k]; the image weight of every task = pixel_values[:, 1, 0, 0]. Attention
    (return_attentions): uniform over [text; image CLS; 2 x 2 patches]."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, pixel_values, input_ids, attention_mask, modality_mask=None, labels=None,
                return_attentions=False, unimodal=False):
        self.calls += 1
        logits = {}
        for k, (task, classes) in enumerate(TASKS.items()):
            confidence = pixel_values[:, 0, 0, k]
            # softmax max = confidence when the other classes share the rest equally
            rest = (1 - confidence) / (len(classes) - 1)
            probs = rest[:, None].repeat(1, len(classes))
            probs[torch.arange(len(probs)), input_ids[:, 1 + k]] = confidence
            logits[task] = probs.log()
        image = pixel_values[:, 1, 0, 0]
        weights = torch.stack([1 - image, image], dim=-1)[:, None].repeat(1, len(TASKS), 1)
        text_length = int(attention_mask.sum(dim=1).max())
        attentions = None
        if return_attentions:
            size = text_length + 1 + 4
            attentions = [torch.full((len(input_ids), 1, size, size), 1.0 / size)]
        # asked for (evaluation): the prediction from each modality alone, here the fused one
        unimodal_logits = {"text": logits, "image": logits} if unimodal else {}
        return SimpleNamespace(logits=logits, modality_weights=weights, attentions=attentions,
                               text_length=text_length, unimodal_logits=unimodal_logits)


def make_batch(indices, labels, predicted, confidences, image_weight=0.25):
    count = len(indices)
    input_ids = torch.zeros(count, CONTEXT, dtype=torch.int64)
    input_ids[:, 0] = SOT_TOKEN_ID
    input_ids[:, 1:3] = torch.tensor(predicted)
    input_ids[:, 3] = EOT_TOKEN_ID
    pixel_values = torch.zeros(count, 3, 2, 2)
    pixel_values[:, 0, 0, :2] = torch.tensor(confidences, dtype=torch.float32)
    pixel_values[:, 1, 0, 0] = image_weight
    return {"pixel_values": pixel_values, "input_ids": input_ids,
            "attention_mask": (torch.arange(CONTEXT) <= 3).long().repeat(count, 1),
            "labels": torch.tensor(labels), "modality_mask": torch.ones(count, 2, dtype=torch.bool),
            "index": torch.tensor(indices)}


class ListLoader:
    def __init__(self, batches):
        self.batches = batches
        self.dataset = DatasetInfo(root=Path("."), tasks=TASKS, splits={}, context_length=CONTEXT)

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


# Six samples. colour: labels 0 1 2 0 1 (missing), predictions 0 1 0 0 2 0 ; kind: all right.
LABELS = [[0, 0], [1, 1], [2, 0], [0, 1], [1, 0], [-1, 1]]
PREDICTED = [[0, 0], [1, 1], [0, 0], [0, 1], [2, 0], [0, 1]]
CONFIDENCES = [[0.9, 0.8], [0.8, 0.8], [0.95, 0.8], [0.7, 0.8], [0.6, 0.8], [0.5, 0.8]]


def batches_with_padding_and_a_repeat():
    first = make_batch([0, 1, 2, 3], LABELS[:4], PREDICTED[:4], CONFIDENCES[:4])
    # sample 3 again (a loader wrapping around), sample 4 and 5, then padding with junk labels
    second = make_batch([3, 4, 5, -1], LABELS[3:6] + [[1, 1]], PREDICTED[3:6] + [[2, 0]],
                        CONFIDENCES[3:6] + [[0.99, 0.99]])
    return [first, second]


def test_each_sample_counted_once_and_padding_dropped():
    model = ScriptedModel().train()
    result = evaluate.evaluate_model(model, ListLoader(batches_with_padding_and_a_repeat()))
    assert model.training, "evaluation must give the model back in training mode"
    assert result.num_samples == 6
    colour = result.metrics["tasks"]["colour"]
    assert colour["n"] == 5
    assert colour["accuracy"] == pytest.approx(3 / 5)
    # ranked: 0.95 wrong, 0.9 right, 0.8 right, 0.7 right, 0.6 wrong: the best prefix (3 of 4) is
    # below 0.9 precision, so nothing qualifies
    assert colour["recall_at_p90"] == 0.0
    kind = result.metrics["tasks"]["kind"]
    assert kind == {"n": 6, "accuracy": 1.0, "macro_f1": 1.0, "recall_at_p90": 1.0}
    assert result.metrics["mean"]["accuracy"] == pytest.approx((3 / 5 + 1) / 2)
    assert result.confusion["colour"].tolist() == [[2, 0, 0], [0, 1, 1], [1, 0, 0]]
    assert result.modality_weights["colour"] == pytest.approx({"text": 0.75, "image": 0.25})


def test_more_precision_levels_and_json_content():
    result = evaluate.evaluate_model(ScriptedModel(), ListLoader(batches_with_padding_and_a_repeat()),
                                     precisions=(0.9, 0.5))
    assert result.metrics["tasks"]["colour"]["recall_at_p50"] == pytest.approx(3 / 5)
    content = result.to_json()
    assert set(content) >= {"tasks", "mean", "classes", "modality_weights", "samples"}
    rows = {row["class"]: row for row in content["classes"]["colour"]}
    assert [row["class"] for row in content["classes"]["colour"]] == ["blue", "red", "green"]  # by support
    assert rows["red"] == {"class": "red", "support": 2, "predicted": 3,
                                               "precision": pytest.approx(2 / 3), "recall": 1.0,
                                               "f1": pytest.approx(0.8)}
    assert "mean accuracy 0.800" in result.summary()


def test_unique_samples_orders_by_index():
    arrays = {"index": np.array([5, -1, 2, 5, 0, -1]), "value": np.array([50, 0, 20, 51, 1, 0])}
    kept = evaluate.unique_samples(arrays)
    assert kept["index"].tolist() == [0, 2, 5] and kept["value"].tolist() == [1, 20, 50]


def test_titles_and_images_removed():
    batch = make_batch([0, 1], LABELS[:2], PREDICTED[:2], CONFIDENCES[:2])
    no_text = evaluate.perturb_batch(batch, "no-text")
    assert no_text["input_ids"][:, :3].tolist() == [[SOT_TOKEN_ID, EOT_TOKEN_ID, 0]] * 2
    assert no_text["attention_mask"].sum(dim=1).tolist() == [2, 2]
    assert no_text["modality_mask"].tolist() == [[False, True]] * 2
    no_image = evaluate.perturb_batch(batch, "no-image")
    assert no_image["pixel_values"].abs().sum() == 0
    assert no_image["modality_mask"].tolist() == [[True, False]] * 2
    assert batch["modality_mask"].all(), "the loader's batch must not be changed in place"
    with pytest.raises(ValueError, match="perturb must be one of"):
        evaluate.perturb_batch(batch, "blur")


def test_drop_words_removes_whole_words():
    # vocab of 10 ids: 3 and 4 are first pieces of a word ("sh" "irt</w>" -> ids 4, 5)
    word_end = np.array([True] * 10)
    word_end[[3, 4]] = False
    ids = np.array([SOT_TOKEN_ID, 1, 4, 5, 2, 3, 6, EOT_TOKEN_ID, 0, 0])
    decisions = iter([True, False, True, True])  # keep word 1, drop [4 5], keep 2, keep [3 6]
    out = evaluate.drop_words(ids, lambda: next(decisions), word_end)
    assert out.tolist() == [SOT_TOKEN_ID, 1, 2, 3, 6, EOT_TOKEN_ID, 0, 0, 0, 0]
    everything_dropped = evaluate.drop_words(ids, lambda: False, word_end)
    assert everything_dropped.tolist()[:3] == [SOT_TOKEN_ID, EOT_TOKEN_ID, 0]


def test_drop_words_is_seeded_per_sample_and_drops_about_30_percent():
    from cmaclip.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(77)
    titles = ["Turtle Check Men Navy Blue Shirt", "Fila Men Cush Flex Black Slippers"] * 100
    ids = torch.from_numpy(tokenizer.encode(titles)).long()
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "index": torch.arange(len(titles))}
    word_end = evaluate.word_end_table(77)
    dropped = evaluate.perturb_batch(batch, "drop-words", seed=3, word_end=word_end)
    words_before = sum(len(t.split()) for t in titles)
    words_after = sum(len(tokenizer.decode(row).split()) for row in dropped["input_ids"].numpy())
    assert 0.2 < 1 - words_after / words_before < 0.4
    # the same sample in another batch, alone, loses the same words
    alone = {key: value[7:8] for key, value in batch.items()}
    assert torch.equal(evaluate.perturb_batch(alone, "drop-words", seed=3, word_end=word_end)["input_ids"][0],
                       dropped["input_ids"][7])
    mask = dropped["attention_mask"][7]
    assert mask.sum() == (dropped["input_ids"][7] != 0).sum()


class RecordingWriter:
    def __init__(self):
        self.scalars, self.images = {}, {}

    def add_scalar(self, tag, value, step):
        self.scalars[tag] = value

    def add_image(self, tag, image, step, dataformats):
        assert dataformats == "HWC" and image.dtype == np.uint8 and image.shape[2] == 3
        self.images[tag] = image

    def flush(self):
        pass


def test_tensorboard_tags():
    result = evaluate.evaluate_model(ScriptedModel(), ListLoader(batches_with_padding_and_a_repeat()))
    writer = RecordingWriter()
    evaluate.log_evaluation(writer, result, step=10)
    for tag in ("eval/colour/accuracy", "eval/colour/recall_at_p90", "eval/kind/accuracy", "eval/mean/accuracy",
                "modality_weight/colour/image", "modality_weight/kind/text"):
        assert tag in writer.scalars, tag
    assert writer.scalars["eval/colour/accuracy"] == pytest.approx(0.6)
    assert set(writer.images) == {"eval/colour/confusion", "eval/kind/confusion", "eval/explain/sample_0",
                                  "eval/explain/sample_1", "eval/explain/sample_2"}
    evaluate.log_evaluation(None, result, step=10)  # other ranks: nothing, no error


def test_table_lists_tasks_and_mean():
    result = evaluate.evaluate_model(ScriptedModel(), ListLoader(batches_with_padding_and_a_repeat()))
    table = evaluate.format_table(result.metrics, result.modality_weights)
    lines = table.splitlines()
    assert lines[0].startswith("| task | n | accuracy | macro-F1 | R@P90 | image weight |")
    assert lines[2].startswith("| colour | 5 | 0.600 |")
    assert lines[-1].startswith("| **mean** |  | 0.800 |")


def evaluate_on_rank(rank: int, port: int, out_dir: str):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    all_batches = batches_with_padding_and_a_repeat()
    # rank 0 gets samples 0-3, rank 1 gets 3 (again), 4, 5 and padding
    result = evaluate.evaluate_model(ScriptedModel(), ListLoader(all_batches[rank:rank + 1]), pictures=3)
    torch.save({**result.to_json(), "pictures": [name for name, _ in result.pictures]}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_count_each_sample_once(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torch.multiprocessing.spawn(evaluate_on_rank, args=(port, str(tmp_path)), nprocs=2)
    single = evaluate.evaluate_model(ScriptedModel(), ListLoader(batches_with_padding_and_a_repeat())).to_json()
    # the pictures are the smallest sample indices of all ranks' first batches, on every rank
    single["pictures"] = ["sample_0", "sample_1", "sample_2"]
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == single


def test_real_loader_and_model_count_the_split_once(fashion_shards, tmp_path, capsys):
    """The tiny random model on real shards through the PIL loader, as a 2-rank run would split
    them (each rank's result alone would be partial; both together must cover the split once)."""
    import json

    from cmaclip.data.config import DataConfig
    from cmaclip.data.format import load_dataset_info
    from cmaclip.data.loader import build_loader
    from cmaclip.model import CMAClip, ModelConfig

    info = load_dataset_info(fashion_shards)
    torch.manual_seed(0)
    model = CMAClip(ModelConfig(preset="tiny"), info.tasks)
    config = DataConfig(loader="pil", workers=0)
    loaders = [build_loader(fashion_shards, "val", config=config, batch_size=8, image_size=model.config.image_size,
                            train=False, rank=rank, world_size=2) for rank in (0, 1)]
    parts = [evaluate.predict_split(model, loader, info.task_names)[0] for loader in loaders]
    merged = evaluate.unique_samples({key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
    assert merged["index"].tolist() == list(range(info.num_samples("val")))

    single = build_loader(fashion_shards, "val", config=config, batch_size=8, image_size=model.config.image_size,
                          train=False)
    result = evaluate.evaluate_model(model, single, pictures=2)
    assert result.num_samples == info.num_samples("val")
    assert len(result.pictures) == 2 and all(p.dtype == np.uint8 and p.ndim == 3 for _, p in result.pictures)
    assert set(result.metrics["tasks"]) == set(info.tasks)

    # the command line on the same model, exported like a training run's output_dir
    run = tmp_path / "run"
    model.save_pretrained(run / "model")
    out = tmp_path / "metrics.json"
    evaluate.main(["--checkpoint", str(run), "--shards", str(fashion_shards), "--split", "val", "--out", str(out),
                   "--loader", "pil", "--batch-size", "16", "--precision", "0.5"])
    written = json.loads(out.read_text())
    for task in info.tasks:
        assert set(written["tasks"][task]) == {"accuracy", "macro_f1", "recall_at_p90", "recall_at_p50", "n"}
        assert written["tasks"][task]["accuracy"] == pytest.approx(result.metrics["tasks"][task]["accuracy"])
    assert set(written["mean"]) == {"accuracy", "macro_f1", "recall_at_p90", "recall_at_p50"}
    assert written["split"] == "val" and written["samples"] == info.num_samples("val")
    assert list((run / "tensorboard" / "eval-val").glob("events.out.tfevents.*"))
    assert "| **mean** |" in capsys.readouterr().out


def test_evaluation_asks_the_model_for_each_modality_alone():
    result = evaluate.evaluate_model(ScriptedModel(), ListLoader(batches_with_padding_and_a_repeat()))
    assert result.unimodal["text"]["tasks"]["colour"] == pytest.approx(3 / 5)  # the fused answers, 5 labelled
    assert result.unimodal["image"]["mean"] == result.unimodal["text"]["mean"]


def test_each_modality_alone_is_scored_on_the_samples_that_have_it():
    samples = {"labels": np.array([[0, 1], [1, -1], [2, 0]]), "predicted": np.array([[1, 1], [1, 0], [1, 0]]),
               "predicted_text": np.array([[0, 1], [0, 0], [2, 1]]), "has_text": np.array([True, True, False]),
               "predicted_image": np.array([[1, 1], [1, 1], [2, 0]]), "has_image": np.array([True, True, True])}
    result = evaluate.unimodal_accuracy(samples, list(TASKS))
    assert {key: result["text"][key] for key in ("tasks", "mean")} == {"tasks": {"colour": 0.5, "kind": 1.0},
                                                                       "mean": 0.75}
    assert result["image"]["tasks"] == {"colour": pytest.approx(2 / 3), "kind": 1.0}
    # overruled: alone right, fused wrong, over the labelled samples with both modalities (rows 0-1;
    # row 2's fused answer loses the image's right colour, but it has no title)
    assert result["text"]["overruled"] == {"tasks": {"colour": 0.5, "kind": 0.0}, "mean": 0.25}
    assert result["image"]["overruled"] == {"tasks": {"colour": 0.0, "kind": 0.0}, "mean": 0.0}
    assert evaluate.unimodal_accuracy({"labels": samples["labels"]}, list(TASKS)) == {}
