"""cmaclip/checkpoint.py: the layout of output_dir, atomic save, keep-last-K, resume=auto, the
RunState a checkpoint holds (loader states as JSON), finding an exported model."""
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cmaclip import checkpoint
from cmaclip.config import ConfigError


class FakeAccelerator:
    """One process: the calls checkpoint.py makes, with save_state writing a small file."""

    def __init__(self, fail_in_save: bool = False):
        self.is_main_process, self.process_index, self.num_processes = True, 0, 1
        self.fail_in_save = fail_in_save
        self.state = SimpleNamespace(deepspeed_plugin=None)

    def wait_for_everyone(self):
        pass

    def save_state(self, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"weights")
        if self.fail_in_save:
            raise KeyboardInterrupt("killed during the save")

    def load_state(self, directory):
        self.loaded = directory


class FakeLoader:
    def __init__(self, position=0):
        self.position = position

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def save(output_dir, step, position=0, keep_last=2, accelerator=None, config=None):
    state = checkpoint.RunState(step=step, world_size=1, config=config, loader=FakeLoader(position).state_dict())
    return checkpoint.save_checkpoint(accelerator or FakeAccelerator(), output_dir, state, keep_last)


def test_an_interrupted_save_keeps_the_previous_checkpoint(tmp_path):
    saved = save(tmp_path, 10, position=3)
    assert saved == tmp_path / "checkpoints" / "step-000000010"
    assert json.loads((saved / "trainer_state.json").read_text()) == {"step": 10, "world_size": 1}
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 20, position=5, accelerator=FakeAccelerator(fail_in_save=True))
    assert (tmp_path / "checkpoints" / ".tmp-step-000000020").is_dir()  # the half-written one
    assert checkpoint.resolve_resume("auto", tmp_path) == saved

    loader, accelerator = FakeLoader(), FakeAccelerator()
    assert checkpoint.load_checkpoint(accelerator, saved, loader).step == 10
    assert loader.position == 3 and accelerator.loaded == str(saved)

    # the next save clears the leftover staging folder
    save(tmp_path, 20, position=5)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000010", "step-000000020"]


def test_only_the_last_k_checkpoints_are_kept_and_resave_replaces(tmp_path):
    for step in (1, 2, 3, 4):
        save(tmp_path, step, position=step)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step-000000003", "step-000000004"]
    save(tmp_path, 4, position=99)
    latest = checkpoint.latest_checkpoint(tmp_path)
    assert json.loads((latest / "loader-rank00000.json").read_text()) == {"position": 99}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000000003", "step-000000004"]


def test_resume_settings(tmp_path):
    assert checkpoint.resolve_resume("auto", tmp_path) is None
    assert checkpoint.resolve_resume("", tmp_path) is None
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        checkpoint.resolve_resume(str(tmp_path), tmp_path)
    saved = save(tmp_path, 5, keep_last=1)
    assert checkpoint.resolve_resume(str(saved), tmp_path) == saved
    with pytest.raises(ConfigError, match="train.resume=auto"):
        checkpoint.resolve_resume("", tmp_path)


def test_the_run_state_round_trips_as_json(tmp_path):
    """Every field of the RunState comes back from disk; nothing in the checkpoint is a pickle."""
    config = {"train": {"batch_size": 8}, "output_dir": str(tmp_path)}
    loader_state = {"epoch": 1, "position": 3, "consumed": "AAAAAA==", "remainder": None, "dali_checkpoint": None}
    state = checkpoint.RunState(step=7, world_size=1, config=config, loader=loader_state)
    saved = checkpoint.save_checkpoint(FakeAccelerator(), tmp_path, state, keep_last=1)
    assert sorted(p.name for p in saved.iterdir()) == ["loader-rank00000.json", "model.safetensors",
                                                       "trainer_state.json"]
    loader = FakeLoader()
    loader.load_state_dict = lambda restored: setattr(loader, "restored", restored)
    assert checkpoint.load_checkpoint(FakeAccelerator(), saved, loader) == state
    assert loader.restored == loader_state
    assert checkpoint.read_run_state(saved) == checkpoint.RunState(step=7, world_size=1, config=config)


def test_a_checkpoint_with_a_pickled_loader_state_still_resumes(tmp_path):
    """Checkpoints written before the JSON loader state hold loader-rank00000.pt (torch.save of the
    same dict): they load through torch's restricted unpickler, which refuses anything but plain
    data, so a .pt that holds an object fails instead of running its code."""
    saved = save(tmp_path, 4, position=3)
    (saved / "loader-rank00000.json").unlink()
    torch.save({"position": 3, "consumed": "AAAAAA==", "remainder": None}, saved / "loader-rank00000.pt")
    loader = FakeLoader()
    assert checkpoint.load_checkpoint(FakeAccelerator(), saved, loader).step == 4
    assert loader.position == 3

    torch.save({"position": SimpleNamespace(code="not data")}, saved / "loader-rank00000.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        checkpoint.load_checkpoint(FakeAccelerator(), saved, FakeLoader())


def test_a_trainer_state_with_unknown_entries_is_refused_by_name(tmp_path):
    saved = save(tmp_path, 4)
    (saved / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": 1, "ema": True}))
    with pytest.raises(ValueError, match=r"trainer_state.json: unknown entries \['ema'\]"):
        checkpoint.read_run_state(saved)


@pytest.mark.parametrize("content, problem", [({"world_size": 1}, r"missing entries \['step'\]"),
                                              ([4, 1], "not a JSON object")])
def test_a_damaged_trainer_state_is_a_value_error(tmp_path, content, problem):
    """resume.py skips a checkpoint whose trainer_state.json raises ValueError (train.resume=auto falls
    back to an older one); before RunState a missing entry did the same, through load_checkpoint."""
    saved = save(tmp_path, 4)
    (saved / "trainer_state.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"trainer_state.json: {problem}"):
        checkpoint.read_run_state(saved)


def test_model_folder_resolution(tmp_path):
    (tmp_path / "model").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "model" / name).write_text("{}")
    assert checkpoint.resolve_model_dir(tmp_path) == tmp_path / "model"
    assert checkpoint.resolve_model_dir(tmp_path / "model") == tmp_path / "model"
    with pytest.raises(FileNotFoundError, match="no exported model"):
        checkpoint.resolve_model_dir(tmp_path / "nothing")
