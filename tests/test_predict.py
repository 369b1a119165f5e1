"""`cmaclip predict` on a tiny random model: every usable product predicted, problems named."""
import json

import pytest
from PIL import Image

from cmaclip import predict

TASKS = {"colour": ["red", "blue", "green"], "kind": ["shirt", "shoe"]}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from cmaclip.model import CMAClip, ModelConfig

    folder = tmp_path_factory.mktemp("run") / "model"
    CMAClip(ModelConfig(preset="tiny"), TASKS).save_pretrained(folder)
    return folder


@pytest.fixture
def catalogue(tmp_path):
    Image.new("RGB", (90, 60), (200, 30, 30)).save(tmp_path / "red.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    lines = [
        {"id": "full", "image": "red.jpg", "text": "Red cotton shirt"},
        {"id": "no-image", "text": "Blue running shoe"},
        {"id": "no-title", "image": "red.jpg", "text": ""},
        {"id": "bad-path", "image": "nowhere/missing.jpg", "text": "Green shirt"},
        "{this is not json",
        {"image": "red.jpg", "text": "a product without an id"},
        {"id": "broken-only", "image": "broken.jpg"},
        {"id": 42, "image": "red.jpg", "text": "integer id"},
    ]
    path = tmp_path / "products.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def run_predict(capsys, *argv):
    predict.main(list(argv))
    return capsys.readouterr()


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])  # bf16: the autocast GPUs run (auto)
def test_every_usable_product_is_predicted(model_dir, catalogue, tmp_path, capsys, mixed_precision):
    out = tmp_path / "preds.jsonl"
    printed = run_predict(capsys, "--checkpoint", str(model_dir.parent), "--input", str(catalogue),
                          "--out", str(out), "--top-k", "2", "--mixed-precision", mixed_precision)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [line["id"] for line in lines] == ["full", "no-image", "no-title", "bad-path", "42"]
    by_id = {line["id"]: line for line in lines}
    for line in lines:
        assert set(line["predictions"]) == set(TASKS)
        for task, prediction in line["predictions"].items():
            assert prediction["label"] in TASKS[task]
            assert [c["label"] for c in prediction["top_k"]][0] == prediction["label"]
            assert len(prediction["top_k"]) == 2
            assert prediction["top_k"][0]["confidence"] >= prediction["top_k"][1]["confidence"]
            assert sum(prediction["modality_weights"].values()) == pytest.approx(1.0, abs=1e-5)
    assert by_id["full"]["missing"] == []
    for product, absent, present in (("no-image", "image", "text"), ("bad-path", "image", "text"),
                                     ("no-title", "text", "image")):
        assert by_id[product]["missing"] == [absent]
        weights = by_id[product]["predictions"]["colour"]["modality_weights"]
        assert weights[absent] == 0.0 and weights[present] == pytest.approx(1.0)

    problems = printed.err.splitlines()
    assert any(p.startswith("line 4 (id bad-path): image: image not found") and "predicted without the image" in p
               for p in problems)
    assert any(p.startswith("line 5: row: malformed JSON") and "skipped" in p for p in problems)
    assert any(p.startswith("line 6: id: missing") for p in problems)
    assert any(p.startswith("line 7 (id broken-only): image: image does not decode") and "row skipped" in p
               for p in problems)
    assert "predicted 5 products" in printed.out and "3 rows skipped" in printed.out


def test_csv_input(model_dir, tmp_path, capsys):
    Image.new("RGB", (40, 80), (0, 0, 200)).save(tmp_path / "blue.jpg")
    (tmp_path / "products.csv").write_text("id,image,title\nx1,blue.jpg,Blue shoe\nx2,,Only a title\n")
    out = tmp_path / "preds.jsonl"
    run_predict(capsys, "--checkpoint", str(model_dir), "--input", str(tmp_path / "products.csv"),
                "--text-column", "title", "--out", str(out))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["x1", "x2"]


def test_failed_run_leaves_the_previous_output(model_dir, tmp_path, capsys):
    out = tmp_path / "preds.jsonl"
    out.write_text("previous results\n")
    with pytest.raises(SystemExit) as stopped:
        run_predict(capsys, "--checkpoint", str(model_dir), "--input", str(tmp_path / "absent.jsonl"),
                    "--out", str(out))
    assert stopped.value.code == 2
    assert "absent.jsonl: input file not found" in capsys.readouterr().err
    assert out.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preds.jsonl"]  # no temporary left behind


def test_a_crash_mid_file_removes_the_temporary(model_dir, catalogue, tmp_path):
    from cmaclip.checkpoint import load_model

    model = load_model(model_dir)
    out = tmp_path / "out" / "preds.jsonl"

    def failing_report(problem):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        predict.predict_file(model, catalogue, out, report=failing_report)
    assert list(out.parent.iterdir()) == []
