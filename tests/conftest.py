import csv
import sys
import tempfile
from pathlib import Path

import pytest
import torch

FASHION_DIR = Path(__file__).resolve().parent.parent / "shards" / "fashion-products"
FASHION_TASKS = ["masterCategory", "subCategory", "baseColour", "gender", "usage"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """In-process tests run small ops: on a 2-core machine that also runs the multi-process tests'
    workers, a second spinning thread costs several times the CPU time it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def launched_processes_leave_nothing_behind(tmp_path_factory):
    """The environment every process a test launches inherits:
    - TMPDIR inside pytest's basetemp, which a passing session removes: torch elastic leaves a
      `torchelastic_*` log folder in the temp dir per launch and multiprocessing a `pymp-*` one,
      hundreds per suite run otherwise left in /tmp. This process keeps its own temp dir: its
      multiprocessing folder is removed at interpreter exit, after pytest has removed the basetemp.
    - DeepSpeed's CPU Adam op built into this venv, not the user's shared ~/.cache, where a build
      killed midway leaves a lock that stalls every later one."""
    tempfile.gettempdir()  # caches this process's temp dir before TMPDIR changes
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmpdir")))
        patch.setenv("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
        yield


@pytest.fixture(scope="session")
def fashion_csv(tmp_path_factory) -> Path:
    """The first 120 embedded fashion products as a CSV (image paths relative to FASHION_DIR)."""
    with open(FASHION_DIR / "metadata.csv", newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))[:121]
    path = tmp_path_factory.mktemp("fashion-catalog") / "products.csv"
    with open(path, "w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    return path


@pytest.fixture(scope="session")
def fashion_shards(tmp_path_factory, fashion_csv) -> Path:
    """A shards folder of those 120 products: the five demo tasks (FASHION_TASKS), about 25% val,
    16 samples per shard (so splits span several shards), context length 77. Read it with
    `cmaclip.data.format.load_dataset_info(fashion_shards)`."""
    from cmaclip.data.shards import write_shards

    out = tmp_path_factory.mktemp("fashion-shards") / "shards"
    write_shards(fashion_csv, FASHION_TASKS, out, image_root=FASHION_DIR, text_column="productDisplayName",
                 val_fraction=0.25, samples_per_shard=16)
    return out


@pytest.fixture(scope="session")
def untrained_fusion():
    """A function giving every fusion layer of a module random residual branches. The layers are
    built as the identity (zero-initialised branches), so on a fresh model any test of what the
    sequence attention computes (masking, pooling, kernels) would pass whatever the code does."""
    from cmaclip.model.attention import FusionLayer

    def scramble(module: torch.nn.Module) -> torch.nn.Module:
        generator = torch.Generator().manual_seed(0)
        for layer in module.modules():
            if isinstance(layer, FusionLayer):
                for branch_output in (layer.attention.out, layer.mlp[-1]):
                    with torch.no_grad():
                        branch_output.weight.normal_(0, branch_output.in_features ** -0.5, generator=generator)
                        branch_output.bias.normal_(0, 0.1, generator=generator)
        return module

    return scramble
