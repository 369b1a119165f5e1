"""The run config: YAML recipes, typed key.sub=value overrides, unknown keys named."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from cmaclip.config import (ConfigError, RunConfig, field_docs, keys_reference, load_config, resolve_config_path,
                            to_yaml)
from cmaclip.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_the_recipes_exist_and_load():
    names = {path.name for path in RECIPES}
    assert {"cpu-demo.yaml", "vit-b16-food101.yaml", "vit-b16-fashiongen.yaml"} <= names
    for path in RECIPES:
        config = load_config(path)
        assert isinstance(config, RunConfig)
        if "pretrain" in yaml.safe_load(path.read_text()):
            continue  # a contrastive pretraining recipe (cmaclip pretrain) trains on pairs: both modalities
        # a product without a title or a photo must be a case every recipe trains on
        assert config.model.modality_dropout > 0, f"{path.name}: model.modality_dropout is off"
    demo = load_config(REPO / "configs" / "cpu-demo.yaml")
    assert demo.model.preset == "tiny" and demo.train.max_steps > 0
    assert load_config(REPO / "configs" / "vit-b16-food101.yaml").model.preset == "vit-b-16"
    large = load_config(REPO / "configs" / "vit-l14-fashiongen.yaml").model
    assert large.preset == "vit-l-14" and large.gradient_checkpointing  # activations recomputed


def test_a_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("configs/cpu-demo.yaml").read_text() == (REPO / "configs" / "cpu-demo.yaml").read_text()
    assert resolve_config_path("cpu-demo.yaml").is_file()
    with pytest.raises(ConfigError, match="no-such.yaml.*cpu-demo.yaml"):
        resolve_config_path("no-such.yaml")


def test_overrides_are_typed_by_the_field():
    config = load_config(REPO / "configs" / "cpu-demo.yaml", [
        "train.max_steps=7", "optim.lr=1e-4", "optim.grad_clip=2", "logging.tensorboard=false",
        "train.resume=", "model.task_weights.baseColour=2.5", "output_dir=/tmp/x", "data.workers=0",
    ])
    assert config.train.max_steps == 7 and isinstance(config.train.max_steps, int)
    assert config.optim.lr == 1e-4 and isinstance(config.optim.grad_clip, float)
    assert config.logging.tensorboard is False
    assert config.train.resume == ""
    assert config.model.task_weights == {"baseColour": 2.5}
    assert config.output_dir == "/tmp/x" and config.data.workers == 0
    # the YAML's other values survive an override in the same section
    assert config.train.batch_size == load_config(REPO / "configs" / "cpu-demo.yaml").train.batch_size


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=5", "unknown config key 'train.max_stepz'.*did you mean train.max_steps"),
    ("trian.max_steps=5", "unknown config key 'trian'"),
    ("model.fusion_heads.x=1", "fusion_heads.*is a value"),
    ("train.max_steps=1.5", "train.max_steps: expected int.*1.5"),
    ("optim.lr=fast", "optim.lr: expected float"),
    ("logging.tensorboard=maybe", "logging.tensorboard: expected bool"),
    ("model.fusion=bogus", "model.fusion"),
    ("train.batch_size=0", "train.batch_size: must be >= 1"),
    ("data.loader=opencv", "data.loader"),
    ("max_steps", "expected key.sub=value"),
])
def test_bad_overrides_are_errors_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_keys_in_yaml_are_errors_naming_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: 5\nmodel:\n  preset: tiny\n  fusoin: cma\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'model.fusoin' in .*bad.yaml.*model.fusion"):
        load_config(path)
    path.write_text("optim:\n  lr: 1e-4\n  warmup_steps: 10\n")  # YAML 1.1 reads 1e-4 as a string
    assert load_config(path).optim.lr == 1e-4
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_cli_reports_config_errors_and_prints_the_resolved_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--config", "configs/cpu-demo.yaml", "train.max_stepz=3"])
    assert exit_info.value.code == 2
    assert "train.max_stepz" in capsys.readouterr().err
    train_main(["--config", "configs/cpu-demo.yaml", "--print-config", "train.max_steps=3"])
    printed = capsys.readouterr().out
    assert "max_steps: 3" in printed
    assert to_yaml(load_config("configs/cpu-demo.yaml", ["train.max_steps=3"])) == printed


def test_every_key_is_documented():
    sections = [RunConfig, *(type(getattr(RunConfig(), f.name)) for f in dataclasses.fields(RunConfig)
                             if dataclasses.is_dataclass(getattr(RunConfig(), f.name)))]
    for section in sections:
        docs = field_docs(section)
        missing = [f.name for f in dataclasses.fields(section) if not docs.get(f.name)]
        assert not missing, f"{section.__name__}: fields without a docstring: {missing}"
    text = keys_reference()
    for key in ("model.preset", "data.shards", "optim.backbone_lr", "train.resume", "logging.log_every", "output_dir"):
        assert f"  {key} = " in text
