"""Fault tolerance in one process: the non-finite guard, the run lock, one-line errors for every
command, config checks on resume, checkpoint fallback, disk-full reporting, shard integrity."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cmaclip import checkpoint

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "configs" / "cpu-demo.yaml")


def train_args(shards: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["--config", RECIPE, f"data.shards={shards}", f"output_dir={output_dir}", "train.max_steps=4",
            "train.batch_size=8", "train.save_every=2", "train.eval_every=0", "data.eval_split=none",
            "data.loader=pil", "data.workers=0", "logging.progress_bar=false", "logging.log_every=1",
            "optim.warmup_steps=1", *extra]


def run_train(shards: Path, output_dir: Path, *extra: str) -> int:
    """`cmaclip train` in this process. -> its exit code (0 when it returned)."""
    from cmaclip.train import main

    try:
        main(train_args(shards, output_dir, *extra))
    except SystemExit as stopped:
        return stopped.code
    return 0


def one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_diverging_run_skips_non_finite_steps_then_stops_with_one_line(fashion_shards, tmp_path, capsys):
    """optim.lr=1e4 turns the loss NaN within a few steps: before the guard the run went on, exited 0
    and wrote NaN checkpoints and a NaN model/."""
    output_dir = tmp_path / "run"
    code = run_train(fashion_shards, output_dir, "train.max_steps=30", "train.save_every=1", "train.keep_last=30",
                     "optim.lr=1e4", "optim.backbone_lr=1e4", "train.max_nonfinite_steps=2")
    line = one_error_line(capsys)
    assert code == 1 and line.startswith("cmaclip train: 2 optimizer steps in a row had a non-finite loss"), line
    log = (output_dir / "train.log").read_text().splitlines()
    assert any("WARNING step " in entry and "non-finite loss or gradient norm, update skipped (1 in a row" in entry
               for entry in log), log
    assert " ERROR stopped: 2 optimizer steps in a row had a non-finite loss" in log[-1], log
    assert not (output_dir / "model").exists()
    saved = checkpoint.list_checkpoints(output_dir)
    assert saved
    for folder in saved:
        weights = load_file(folder / "model.safetensors")
        assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point()), folder


def test_a_second_run_into_the_same_output_dir_is_refused(fashion_shards, tmp_path, capsys):
    """Before the lock, two trainings into one folder both exited 0, one replacing the other's files."""
    import subprocess
    import sys

    output_dir = tmp_path / "run"
    output_dir.mkdir()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # "the first run"
    try:
        (output_dir / "LOCK").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": other.pid}))
        assert run_train(fashion_shards, output_dir) == 1
        line = one_error_line(capsys)
        assert f"is in use by another run (pid {other.pid}" in line and "LOCK" in line
        assert not (output_dir / "checkpoints").exists()
    finally:
        other.kill()
        other.wait()
    # that process is gone now: its lock is stale, taken over, and released at the end
    assert run_train(fashion_shards, output_dir, "train.max_steps=1") == 0
    assert "removed a stale lock" in capsys.readouterr().out
    assert not (output_dir / "LOCK").exists() and (output_dir / "model").is_dir()


def test_output_dir_that_is_a_file_is_one_line(fashion_shards, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run_train(fashion_shards, tmp_path / "file") == 2
    assert one_error_line(capsys) == f"cmaclip train: output_dir: {tmp_path / 'file'} is a file, not a folder"


@pytest.fixture(scope="module")
def finished_run(fashion_shards, tmp_path_factory) -> Path:
    """4 steps, checkpoints at steps 2 and 4 (recipe: model.fusion_heads=4, optim.lr=1e-3)."""
    output_dir = tmp_path_factory.mktemp("finished") / "run"
    assert run_train(fashion_shards, output_dir) == 0
    return output_dir


def copy_of(run: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


def test_resume_refuses_a_changed_architecture_key_in_one_line(finished_run, fashion_shards, tmp_path, capsys):
    """Before: model.fusion_heads 4 -> 8 resumed with the weights reinterpreted."""
    output_dir = copy_of(finished_run, tmp_path)
    capsys.readouterr()
    assert run_train(fashion_shards, output_dir, "train.max_steps=6", "model.fusion_heads=8") == 2
    line = one_error_line(capsys)
    assert "model.fusion_heads (saved 4, now 8) must stay as saved" in line and "step-000000004" in line
    assert checkpoint.latest_checkpoint(output_dir).name == "step-000000004"


def test_resume_logs_allowed_changes_and_keeps_the_first_config(finished_run, fashion_shards, tmp_path, capsys):
    """Before: output_dir/config.yaml was overwritten by every start."""
    output_dir = copy_of(finished_run, tmp_path)
    first = (output_dir / "config.yaml").read_text()
    capsys.readouterr()
    assert run_train(fashion_shards, output_dir, "train.max_steps=6", "optim.lr=5e-4") == 0
    out = capsys.readouterr().out
    assert "config changed since step-000000004: optim.lr: 0.001 -> 0.0005" in out
    assert (output_dir / "config.yaml").read_text() == first
    assert "lr: 0.0005" in (output_dir / "config-2.yaml").read_text()


def test_train_log_keeps_every_start_resume_evaluation_and_the_end(finished_run, fashion_shards, tmp_path, capsys,
                                                                     monkeypatch):
    """output_dir/train.log (rank 0, appended by every start): what the terminal showed besides the
    progress, plus the parameters per optimizer group."""
    output_dir = copy_of(finished_run, tmp_path)
    monkeypatch.setattr("sys.stderr.isatty", lambda: False)  # progress as step lines on stdout
    assert run_train(fashion_shards, output_dir, "train.max_steps=5", "data.eval_split=val",
                     "logging.progress_bar=true") == 0
    out = capsys.readouterr().out
    log = (output_dir / "train.log").read_text()
    starts = [line for line in log.splitlines() if " INFO start: 1 process(es), output_dir " in line]
    assert len(starts) == 2 and "train.max_steps=5" in starts[1], log
    groups = re.findall(r"parameters per optimizer group: (.*)", log)
    assert len(groups) == 2 and re.findall(r"(\w+) [\d,]+ \(lr", groups[0]) == [
        "backbone_no_decay", "backbone", "new_no_decay", "new"], groups
    assert log.count("trainable + 0 frozen parameters (text encoder") == 2
    assert f"resumed from {output_dir / 'checkpoints' / 'step-000000004'} at step 4" in log
    assert "config changed since step-000000004: data.eval_split: 'none' -> 'val'" in log
    summary = next(line for line in out.splitlines() if line.startswith("step 5: eval ("))
    assert log.count("efficiency: ") == 2 and summary in log
    assert "step 5/5: loss" in out and "step 5/5" not in log  # the progress stays on the terminal


def test_auto_resume_falls_back_to_the_newest_checkpoint_that_loads(finished_run, fashion_shards, tmp_path, capsys):
    """Before: a damaged newest checkpoint stopped train.resume=auto with a traceback."""
    output_dir = copy_of(finished_run, tmp_path)
    (output_dir / "checkpoints" / "step-000000004" / "model.safetensors").write_bytes(b"\0" * 100)
    capsys.readouterr()
    assert run_train(fashion_shards, output_dir, "train.max_steps=5") == 0
    out = capsys.readouterr().out
    assert "skipped checkpoint(s) that do not load: step-000000004 (" in out
    assert "resumed from" in out and "step-000000002 at step 2" in out


def test_a_checkpoint_of_another_model_stops_the_resume_in_one_line(finished_run, fashion_shards, tmp_path, capsys):
    """Before: a checkpoint of cmaclip 0.1's save format 2 (separate unimodal heads) was "damaged",
    and train.resume=auto went on to older ones that do not fit either."""
    from safetensors.torch import save_file

    output_dir = copy_of(finished_run, tmp_path)
    for step in ("step-000000002", "step-000000004"):
        weights_file = output_dir / "checkpoints" / step / "model.safetensors"
        weights = load_file(weights_file)
        save_file({**weights, "unimodal_heads.0.net.1.weight": torch.zeros(2, 2)}, weights_file)
    capsys.readouterr()
    assert run_train(fashion_shards, output_dir, "train.max_steps=5") == 1
    line = one_error_line(capsys)
    assert f"cannot resume {output_dir / 'checkpoints' / 'step-000000004'}: its model has other parameters" in line
    assert 'Unexpected key(s) in state_dict: "unimodal_heads.0.net.1.weight"' in line
    assert "start a new output_dir" in line and "damaged" not in line


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_staging_folder(fashion_shards, tmp_path):
    """A file-size limit makes every write past 256 KiB fail as on a full disk (EFBIG). Before:
    ~100 lines, or "basic_ios::clear: iostream error", and the partial staging folder stayed."""
    import subprocess
    import sys

    output_dir = tmp_path / "run"
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))\n"
              "from cmaclip.train import main\n"
              "main(sys.argv[1:])\n")
    done = subprocess.run([sys.executable, "-c", script, *train_args(fashion_shards, output_dir, "logging.tensorboard=false")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith(f"cmaclip train: writing {output_dir / 'checkpoints' / '.tmp-step-000000002'} failed: ")
    assert "free there)" in lines[0]
    assert list((output_dir / "checkpoints").iterdir()) == []


@pytest.mark.parametrize("node_rank", [0, 1])
def test_a_node_that_never_arrives_is_named_after_the_rendezvous_time_out(node_rank, tmp_path):
    """Before: a two-node launch whose other node never started waited without a word."""
    import os
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "NUM_NODES": "2", "NODE_RANK": str(node_rank), "MAIN_ADDR": "127.0.0.1",
           "MAIN_PORT": str(port - 1), "RDZV_TIMEOUT": "3", "ACCELERATE": str(Path(sys.executable).parent / "accelerate")}
    started = time.monotonic()
    done = subprocess.run(["bash", str(REPO / "launchers" / "slurm" / "launch.sh"), "--config", RECIPE],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and time.monotonic() - started < 60
    expected = (f"node(s) 1 of 2 did not join the rendezvous at 127.0.0.1:{port} within 3 s (joined: 0 "
                f"({socket.gethostname()})): did they start, and can they reach 127.0.0.1?" if node_rank == 0 else
                f"node 1: no rendezvous with node 0 at 127.0.0.1:{port} within 3 s: did node 0 start, and is "
                f"127.0.0.1:{port} reachable from here?")
    assert done.stderr.strip() == f"cmaclip rendezvous: {expected}", done.stderr


def damaged_copy(shards: Path, tmp_path: Path, split: str = "train") -> tuple[Path, Path]:
    """A copy of `shards` whose first `split` tar has random bytes over its second sample's JPEG
    (the tar keeps its size). -> (folder, damaged tar)."""
    import shutil

    copy = Path(shutil.copytree(shards, tmp_path / "shards"))
    tar = copy / json.loads((copy / "dataset.json").read_text())["splits"][split]["shards"][0]
    entry = (tar.with_name(tar.name + ".idx")).read_text().splitlines()[2].split()
    offset, size = int(entry[entry.index("jpg") + 1]), int(entry[entry.index("jpg") + 2])
    with open(tar, "r+b") as file:
        file.seek(offset + 20)  # inside the JPEG header segments
        file.write(bytes(__import__("random").Random(0).randrange(256) for _ in range(min(200, size // 3))))
    return copy, tar


def test_shards_record_checksums_and_verify_names_the_damaged_tar(fashion_shards, tmp_path, capsys):
    from cmaclip.data.shards import main

    info = json.loads((fashion_shards / "dataset.json").read_text())
    tars = [name for split in info["splits"].values() for name in split["shards"]]
    assert set(info["files"]) == {*tars, *(f"{name}.idx" for name in tars)}
    assert all(len(record["sha256"]) == 64 for record in info["files"].values())
    with pytest.raises(SystemExit) as stopped:
        main(["--verify", str(fashion_shards)])
    assert stopped.value.code == 0 and "120 samples checked, 0 problem(s)" in capsys.readouterr().out

    copy, tar = damaged_copy(fashion_shards, tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(["--verify", str(copy)])
    captured = capsys.readouterr()
    assert stopped.value.code == 1 and "1 problem(s)" in captured.out or "2 problem(s)" in captured.out
    assert f"{tar}: contents differ from the SHA-256 recorded in dataset.json (damaged)" in captured.err


def test_a_truncated_or_missing_shard_is_named_when_the_loader_starts(fashion_shards, tmp_path):
    """Before: a truncated tar was reported as a malformed index (or crashed inside DALI)."""
    import shutil

    from cmaclip.data.config import DataConfig
    from cmaclip.data.loader import build_loader
    from cmaclip.errors import DataError

    copy = Path(shutil.copytree(fashion_shards, tmp_path / "shards"))
    tar = copy / json.loads((copy / "dataset.json").read_text())["splits"]["train"]["shards"][1]
    size = tar.stat().st_size
    with open(tar, "r+b") as file:
        file.truncate(size - 4096)
    arguments = dict(config=DataConfig(loader="pil", workers=0), batch_size=4, image_size=32, train=True)
    with pytest.raises(DataError, match=f"{tar}: {size - 4096} bytes, but dataset.json records {size} "):
        build_loader(copy, "train", **arguments)
    tar.unlink()
    with pytest.raises(DataError, match=f"{tar}: missing"):
        build_loader(copy, "train", **arguments)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_damaged_image_inside_dali_names_the_shard(train, fashion_shards, tmp_path):
    """Before: "nvImageCodec failure: '#4'" with no file named (train), a segfault (eval)."""
    pytest.importorskip("nvidia.dali")
    from cmaclip.data.config import DataConfig
    from cmaclip.data.loader import build_loader
    from cmaclip.errors import DataError

    split = "train" if train else "val"
    copy, tar = damaged_copy(fashion_shards, tmp_path, split)
    loader = build_loader(copy, split, config=DataConfig(loader="dali", workers=1), batch_size=8, image_size=32,
                          train=train)
    with pytest.raises(DataError, match=f"DALI failed reading split '{split}'.*{tar}: contents differ"):
        for _ in loader:
            pass


def test_image_paths_that_leave_the_image_root_are_skipped_unless_allowed(tmp_path):
    """Before: a path escaping --image-root was read and the image there embedded."""
    import shutil

    from cmaclip.data.shards import write_shards

    images = REPO / "shards" / "fashion-products" / "images"
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(images / "10000.jpg", root / "inside.jpg")
    shutil.copy(images / "10007.jpg", tmp_path / "outside.jpg")
    rows = [{"id": "a", "image": "inside.jpg", "text": "a shirt", "labels": {"kind": "shirt"}},
            {"id": "b", "image": "../outside.jpg", "text": "a shoe", "labels": {"kind": "shoe"}},
            {"id": "c", "image": str(tmp_path / "outside.jpg"), "text": "a shoe", "labels": {"kind": "shoe"}}]
    catalog = tmp_path / "products.jsonl"
    catalog.write_text("".join(json.dumps(row) + "\n" for row in rows))
    contained = write_shards(catalog, ["kind"], tmp_path / "contained", image_root=root, val_fraction=0)
    assert [(s["id"], s["reason"].split(":")[0]) for s in contained["skipped"]] == [
        ("b", f"image path leaves the image root {root}"), ("c", f"image path leaves the image root {root}")]
    allowed = write_shards(catalog, ["kind"], tmp_path / "allowed", image_root=root, val_fraction=0,
                           allow_outside_image_root=True)
    assert allowed["skipped"] == [] and allowed["splits"]["train"]["samples"] == 3


def edited_copy(shards: Path, tmp_path: Path, edit) -> Path:
    """A copy of `shards` with edit(dataset.json dict) applied (None: dataset.json made invalid)."""
    import shutil

    copy = Path(shutil.copytree(shards, tmp_path / "edited"))
    path = copy / "dataset.json"
    if edit is None:
        path.write_text(path.read_text()[:-20])
    else:
        info = json.loads(path.read_text())
        edit(info)
        path.write_text(json.dumps(info))
    return copy


def drop_an_index(info):
    pass  # the .idx is deleted below


def test_train_failures_are_one_line(fashion_shards, finished_run, tmp_path, capsys):
    """Before: each of these printed a 15-90 line traceback (dataset.json with invalid JSON unnamed)."""
    def first_train_tar(shards):
        return shards / json.loads((shards / "dataset.json").read_text())["splits"]["train"]["shards"][0]

    missing_index = edited_copy(fashion_shards, tmp_path / "a", drop_an_index)
    (first_train_tar(missing_index).with_suffix(".tar.idx")).unlink()
    invalid = edited_copy(fashion_shards, tmp_path / "b", None)

    def one_class(info):
        info["tasks"]["usage"] = info["tasks"]["usage"][:1]

    out_of_range = edited_copy(fashion_shards, tmp_path / "c", one_class)
    cases = [
        ((tmp_path / "none", tmp_path / "r1"), f"{tmp_path / 'none' / 'dataset.json'} not found"),
        ((missing_index, tmp_path / "r2"), f"{first_train_tar(missing_index)}.idx: missing"),
        ((invalid, tmp_path / "r3"), f"{invalid / 'dataset.json'}: not valid JSON"),
        ((out_of_range, tmp_path / "r4"), "for task 'usage', which has 1 classes in dataset.json"),
    ]
    for (shards, output_dir), expected in cases:
        assert run_train(shards, output_dir) == 1, expected
        line = one_error_line(capsys)
        assert line.startswith("cmaclip train: ") and expected in line, line
    resumed = copy_of(finished_run, tmp_path)
    assert run_train(fashion_shards, resumed, "train.max_steps=6", "train.batch_size=4") == 2
    assert "train.batch_size (saved 8, now 4) must stay as saved" in one_error_line(capsys)


def test_eval_and_predict_failures_are_one_line(fashion_shards, finished_run, tmp_path, capsys):
    """Before: a task mismatch in eval was a traceback; predict wrote "confidence": NaN (not JSON)."""
    import shutil

    from safetensors.torch import save_file

    from cmaclip.evaluate import main as eval_main
    from cmaclip.predict import main as predict_main

    def rename_task(info):
        info["tasks"] = {("colour" if task == "baseColour" else task): classes for task, classes in info["tasks"].items()}

    other_tasks = edited_copy(fashion_shards, tmp_path, rename_task)
    with pytest.raises(SystemExit) as stopped:
        eval_main(["--checkpoint", str(finished_run), "--shards", str(other_tasks), "--split", "val",
                   "--loader", "pil", "--out", str(tmp_path / "metrics.json")])
    assert stopped.value.code == 1
    assert "was trained on tasks/classes that differ from" in one_error_line(capsys)

    diverged = Path(shutil.copytree(finished_run / "model", tmp_path / "diverged"))
    weights = load_file(diverged / "model.safetensors")
    weights[next(iter(weights))].fill_(math.nan)
    save_file(weights, diverged / "model.safetensors")
    products = tmp_path / "products.jsonl"
    products.write_text(json.dumps({"id": "1", "text": "a red shirt"}) + "\n")
    with pytest.raises(SystemExit) as stopped:
        predict_main(["--checkpoint", str(diverged), "--input", str(products), "--out", str(tmp_path / "p.jsonl")])
    assert stopped.value.code == 2 and "weight tensors hold NaN/inf" in one_error_line(capsys)
    assert not (tmp_path / "p.jsonl").exists()


def test_ctrl_c_is_one_line(fashion_shards, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    output_dir = tmp_path / "run"
    # A suite started in the background (`cmd &` in a script) inherits SIGINT ignored, and Python
    # then keeps ignoring it: give the training the disposition a terminal's foreground job has.
    process = subprocess.Popen([sys.executable, "-m", "cmaclip.train", *train_args(fashion_shards, output_dir,
                                "train.max_steps=1000", "train.save_every=0")],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while not (output_dir / "tensorboard").is_dir() or not any((output_dir / "tensorboard").iterdir()):
        assert time.time() < deadline and process.poll() is None
        time.sleep(0.5)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and stderr.strip().splitlines() == ["cmaclip train: interrupted (Ctrl-C)"], stderr
    assert not (output_dir / "LOCK").exists()
