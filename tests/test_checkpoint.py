"""cmaclip/checkpoint.py: the layout of output_dir, finding an exported model."""
import pytest

from cmaclip import checkpoint


def test_model_folder_resolution(tmp_path):
    (tmp_path / "model").mkdir()
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "model" / name).write_text("{}")
    assert checkpoint.resolve_model_dir(tmp_path) == tmp_path / "model"
    assert checkpoint.resolve_model_dir(tmp_path / "model") == tmp_path / "model"
    with pytest.raises(FileNotFoundError, match="no exported model"):
        checkpoint.resolve_model_dir(tmp_path / "nothing")
