"""`cmaclip predict --shards` on a tiny random model: every sample of the split exactly once with
its id, whatever the number of ranks and nodes; calibrated decisions; resumable runs; one-line
errors. The ids are checked against the tars themselves, read here without cmaclip."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from cmaclip import batch_predict, predict
from cmaclip.calibration import Calibration, TaskCalibration
from cmaclip.data.format import load_dataset_info
from cmaclip.distributed import free_port
from cmaclip.errors import EXIT_ERROR
from test_train_distributed import environment

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(fashion_shards, tmp_path_factory) -> Path:
    from cmaclip.model import CMAClip, ModelConfig

    folder = tmp_path_factory.mktemp("run") / "model"
    CMAClip(ModelConfig(preset="tiny"), load_dataset_info(fashion_shards).tasks).save_pretrained(folder)
    return folder


def shard_ids(shards: Path, split: str) -> list[str]:
    """The split's product ids in sample order, straight from the tar members `<key>.id`."""
    ids = []
    for name in load_dataset_info(shards).splits[split].shards:
        with tarfile.open(shards / name) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".id")), key=lambda m: m.name)
            ids += [tar.extractfile(m).read().decode() for m in members]
    return ids


def shard_labels(shards: Path, split: str) -> list[list[int]]:
    """The split's labels (class indices, -1 = missing) in sample order, from the tar members `<key>.lbl`."""
    labels = []
    for name in load_dataset_info(shards).splits[split].shards:
        with tarfile.open(shards / name) as tar:
            members = sorted((m for m in tar.getmembers() if m.name.endswith(".lbl")), key=lambda m: m.name)
            labels += [np.frombuffer(tar.extractfile(m).read(), "<i4").tolist() for m in members]
    return labels


def rows(out: Path) -> list[dict]:
    """Every part's rows, in (index, task) order."""
    parts = sorted(out.glob("part-*.parquet"))
    table = [row for part in parts for row in pq.read_table(part).to_pylist()]
    return sorted(table, key=lambda row: (row["index"], row["task"]))


def run_predict(capsys, *argv) -> tuple[int, str, str]:
    try:
        predict.main([*map(str, argv)])
        code = 0
    except SystemExit as stop:
        code = stop.code
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def assert_same_predictions(got: list[dict], expected: list[dict]) -> None:
    """Equal up to float rounding (the batches' composition differs between runs)."""
    assert [(r["id"], r["index"], r["task"], r["label"], r["decision"]) for r in got] == \
           [(r["id"], r["index"], r["task"], r["label"], r["decision"]) for r in expected]
    for a, b in zip(got, expected):
        assert [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]]
        for key in ("confidence", "weight_text", "weight_image"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["id"], key)


def test_every_sample_of_the_split_once_with_its_id(model_dir, fashion_shards, tmp_path, capsys):
    out = tmp_path / "preds"
    code, printed, _ = run_predict(capsys, "--checkpoint", model_dir.parent, "--shards", fashion_shards,
                                   "--split", "val", "--out", out, "--loader", "pil", "--workers", 0,
                                   "--batch-size", 8, "--top-k", 2)  # 31 val samples: the last batch is padded
    assert code == 0
    tasks = load_dataset_info(fashion_shards).tasks
    ids = shard_ids(fashion_shards, "val")
    table = rows(out)
    assert [(r["index"], r["id"], r["task"]) for r in table] == \
           [(i, product, task) for i, product in enumerate(ids) for task in sorted(tasks)]
    for row in table:
        assert row["label"] == row["top_k"][0]["label"] and row["label"] in tasks[row["task"]]
        assert len(row["top_k"]) == 2 and row["top_k"][0]["confidence"] >= row["top_k"][1]["confidence"]
        assert row["confidence"] == row["top_k"][0]["confidence"]
        assert row["weight_text"] + row["weight_image"] == pytest.approx(1.0, abs=1e-5)
        assert row["decision"] == "review"  # the model has no calibration.json
    assert pq.read_schema(out / "part-00000-of-00001.parquet").names == batch_predict.parquet_schema().names
    assert pq.read_table(out).num_rows == len(table)  # the folder reads as one table (_summary.json skipped)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["products"] == summary["samples"] == len(ids) and summary["unreadable"] == []
    assert summary["tasks"] == {task: {"accept": 0, "review": len(ids), "accept_fraction": 0.0} for task in tasks}
    assert "every decision is review" in printed and not list(out.glob("*.partial"))


def never_accepted(tasks: dict) -> dict[str, str]:
    return {task: classes[0] for task, classes in tasks.items()}


@pytest.fixture(scope="module")
def calibrated_model(model_dir, fashion_shards, tmp_path_factory) -> Path:
    """The model with a hand-made calibration.json: temperature 0.5, threshold 1.5 / classes per
    task, and each task's first class never accepted."""
    folder = tmp_path_factory.mktemp("calibrated") / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).symlink_to(model_dir / name)
    tasks = load_dataset_info(fashion_shards).tasks
    Calibration(target_precision=0.9, tasks={
        task: TaskCalibration(temperature=0.5, threshold=1.5 / len(classes),
                              class_thresholds={never_accepted(tasks)[task]: None})
        for task, classes in tasks.items()}).save(folder)
    return folder


def test_calibrated_decisions_follow_the_thresholds(model_dir, calibrated_model, fashion_shards, tmp_path, capsys):
    """`accept` exactly where the calibrated confidence reaches the predicted class's threshold."""
    tasks = load_dataset_info(fashion_shards).tasks
    never = never_accepted(tasks)
    plain, out = tmp_path / "plain", tmp_path / "calibrated"
    for model, folder in ((model_dir, plain), (calibrated_model, out)):
        assert run_predict(capsys, "--checkpoint", model, "--shards", fashion_shards, "--split", "val", "--out", folder,
                           "--loader", "pil", "--workers", 0)[0] == 0
    decisions = {"accept": 0, "review": 0}
    for row, uncalibrated in zip(rows(out), rows(plain)):
        assert row["label"] == uncalibrated["label"]  # a temperature never changes the argmax
        assert row["confidence"] > uncalibrated["confidence"]  # T < 1 sharpens
        threshold = math.inf if row["label"] == never[row["task"]] else 1.5 / len(tasks[row["task"]])
        assert row["decision"] == ("accept" if row["confidence"] >= np.float32(threshold) else "review")
        decisions[row["decision"]] += 1
    assert decisions["accept"] > 0 and decisions["review"] > 0
    summary = json.loads((out / "_summary.json").read_text())
    assert sum(c["accept"] for c in summary["tasks"].values()) == decisions["accept"]


def test_eval_reports_the_precision_and_coverage_of_predicts_accepted_attributes(calibrated_model, fashion_shards,
                                                                                tmp_path, capsys):
    from cmaclip import evaluate

    arguments = ("--checkpoint", calibrated_model, "--shards", fashion_shards, "--split", "val", "--loader", "pil")
    assert run_predict(capsys, *arguments, "--workers", 0, "--out", tmp_path / "preds")[0] == 0
    evaluate.main([*map(str, arguments), "--out", str(tmp_path / "metrics.json")])
    assert "auto-fill at precision 0.9" in capsys.readouterr().out
    auto_fill = json.loads((tmp_path / "metrics.json").read_text())["auto_fill"]
    info = load_dataset_info(fashion_shards)
    labels = shard_labels(fashion_shards, "val")
    predicted = {(row["index"], row["task"]): row for row in rows(tmp_path / "preds")}
    for k, (task, classes) in enumerate(info.tasks.items()):
        labelled = [i for i in range(len(labels)) if labels[i][k] >= 0]
        accepted = [i for i in labelled if predicted[i, task]["decision"] == "accept"]
        correct = sum(predicted[i, task]["label"] == classes[labels[i][k]] for i in accepted)
        assert auto_fill["tasks"][task]["n"] == len(labelled) and auto_fill["tasks"][task]["accepted"] == len(accepted)
        assert auto_fill["tasks"][task]["coverage"] == pytest.approx(len(accepted) / len(labelled))
        assert auto_fill["tasks"][task]["precision"] == (pytest.approx(correct / len(accepted)) if accepted else None)
    assert sum(task["accepted"] for task in auto_fill["tasks"].values()) > 0


def test_calibrate_fits_on_a_split_and_saves_next_to_the_model(model_dir, fashion_shards, tmp_path, capsys):
    from cmaclip import calibrate

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model / name).symlink_to(model_dir / name)
    calibrate.main(["--checkpoint", str(tmp_path), "--shards", str(fashion_shards), "--split", "val",
                    "--precision", "0.3", "--min-class-samples", "5", "--loader", "pil"])
    printed = capsys.readouterr().out
    saved = Calibration.load(model)
    info = load_dataset_info(fashion_shards)
    assert saved.samples == info.num_samples("val") and saved.target_precision == 0.3 and saved.split == "val"
    assert list(saved.tasks) == list(info.tasks) and "auto-fill at precision 0.3" in printed
    for task in saved.tasks.values():
        assert task.temperature > 0 and task.n > 0 and task.ece_after is not None
        assert task.precision is None or task.precision >= 0.3
    for checkpoint, shards, message in ((tmp_path / "nowhere", fashion_shards, "no exported model"),
                                        (tmp_path, tmp_path, "dataset.json not found")):
        with pytest.raises(SystemExit) as stop:
            calibrate.main(["--checkpoint", str(checkpoint), "--shards", str(shards)])
        err = capsys.readouterr().err
        assert stop.value.code == EXIT_ERROR and err.count("\n") == 1 and err.startswith("cmaclip calibrate: ") and message in err


def test_a_rerun_skips_the_finished_part_and_ignores_a_killed_runs_leftover(model_dir, fashion_shards, tmp_path,
                                                                            capsys):
    out = tmp_path / "preds"
    arguments = ("--checkpoint", model_dir, "--shards", fashion_shards, "--split", "val", "--out", out,
                 "--loader", "pil", "--workers", 0)
    assert run_predict(capsys, *arguments)[0] == 0
    part = out / "part-00000-of-00001.parquet"
    written, first = part.stat().st_mtime_ns, rows(out)
    code, printed, _ = run_predict(capsys, *arguments)
    assert code == 0 and "its share is done" in printed and part.stat().st_mtime_ns == written
    # what a run killed mid-way leaves: no part, a half-written .partial
    part.rename(out / ".part-00000-of-00001.parquet.partial")
    (out / ".part-00000-of-00001.parquet.partial").write_bytes(b"PAR1 cut short")
    assert run_predict(capsys, *arguments)[0] == 0
    assert rows(out) == first and not list(out.glob("*.partial"))


@pytest.mark.parametrize("case, message", [
    ("no-checkpoint", "no exported model"),
    ("no-shards", "dataset.json not found"),
    ("empty-split", "split 'test' has no samples"),
    ("out-is-a-file", "must be a folder"),
    ("another-run", "a part of another run (split 'val' (now 'train'))"),
])
def test_bad_arguments_are_one_line_errors(case, message, model_dir, fashion_shards, tmp_path, capsys):
    checkpoint, shards, split, out = model_dir, fashion_shards, "train", tmp_path / "preds"
    if case == "no-checkpoint":
        checkpoint = tmp_path / "nowhere"
    elif case == "no-shards":
        shards = tmp_path
    elif case == "empty-split":
        split = "test"
    elif case == "out-is-a-file":
        out.write_text("")
    else:
        out.mkdir()  # a part (no rows) of the same run but for the val split
        run = {"checkpoint": str(model_dir.resolve()), "shards": str(fashion_shards.resolve()), "split": "val",
               "world_size": 1, "top_k": 3, "calibration": None}
        batch_predict.PartWriter(out / "part-00000-of-00001.parquet").close(
            {"run": run, "rank": 0, "products": 0, "unreadable": []})
    code, _, err = run_predict(capsys, "--checkpoint", checkpoint, "--shards", shards, "--split", split,
                               "--out", out, "--loader", "pil")
    assert code == EXIT_ERROR
    assert err.count("\n") == 1 and err.startswith("cmaclip predict: ") and message in err, err


# ---- several processes ---------------------------------------------------------------------------

def predict_command(model_dir: Path, shards: Path, out: Path, *extra) -> list[str]:
    return ["--checkpoint", str(model_dir), "--shards", str(shards), "--split", "train", "--out", str(out),
            "--batch-size", "4", "--workers", "1", *extra]


def one_process(model_dir: Path, shards: Path, out: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cmaclip.predict", *predict_command(model_dir, shards, out, *extra)],
                            cwd=REPO, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(process: subprocess.Popen) -> str:
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-5000:]
    return output


@pytest.fixture(scope="module")
def one_process_predictions(model_dir, fashion_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one-process") / "preds"
    finish(one_process(model_dir, fashion_shards, out))
    return out


def two_nodes(model_dir: Path, shards: Path, out: Path) -> str:
    """launchers/slurm/launch.sh as predict.sbatch runs it on 2 nodes x 2 processes, both "nodes"
    on this machine (cpu.yaml: gloo)."""
    env = {**environment(), "NUM_NODES": "2", "PROCS_PER_NODE": "2", "MAIN_ADDR": "127.0.0.1",
           "MAIN_PORT": str(free_port()), "ACCELERATE_CONFIG": "launchers/accelerate/cpu.yaml",
           "ACCELERATE": str(Path(sys.executable).parent / "accelerate"), "MODULE": "cmaclip.predict"}
    nodes = [subprocess.Popen(["bash", "launchers/slurm/launch.sh", *predict_command(model_dir, shards, out)],
                              cwd=REPO, env={**env, "NODE_RANK": str(node)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    return "".join(finish(node) for node in nodes)


@pytest.mark.slow
def test_four_ranks_on_two_simulated_nodes_match_one_process(one_process_predictions, model_dir, fashion_shards,
                                                              tmp_path):
    out = tmp_path / "preds"
    output = two_nodes(model_dir, fashion_shards, out)
    assert sorted(p.name for p in out.glob("part-*")) == [f"part-0000{r}-of-00004.parquet" for r in range(4)]
    expected = rows(one_process_predictions)
    assert_same_predictions(rows(out), expected)
    tasks = load_dataset_info(fashion_shards).tasks
    assert [r["id"] for r in expected] == [i for i in shard_ids(fashion_shards, "train") for _ in tasks]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["world_size"] == 4 and summary["products"] == summary["samples"], output

    # rank 2's part lost (as if its node died): the rerun redoes that part only
    (out / "part-00002-of-00004.parquet").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*")}
    output = two_nodes(model_dir, fashion_shards, out)
    assert output.count("its share is done") == 3 and "rank 2: " in output
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    assert_same_predictions(rows(out), expected)


@pytest.mark.slow
def test_a_run_killed_mid_way_and_rerun_gives_the_same_output(one_process_predictions, model_dir, fashion_shards,
                                                              tmp_path):
    out = tmp_path / "preds"
    partial = out / ".part-00000-of-00001.parquet.partial"
    process = one_process(model_dir, fashion_shards, out, "--batch-size", "1")
    deadline = time.time() + 240
    while not partial.exists():
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    # killed once its part is open: its 90 batches of 1 can all run within a second on an idle
    # machine (a fresh-clone CI run saw a 1 s wait find the run finished)
    time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert partial.exists() and not list(out.glob("*.parquet")), "the run finished before it was killed"
    finish(one_process(model_dir, fashion_shards, out))
    assert_same_predictions(rows(out), rows(one_process_predictions))
    assert not partial.exists()
