"""The documentation that is generated from code stays in step with it."""
from pathlib import Path

from cmaclip.config import keys_reference

CONFIG_DOC = Path(__file__).resolve().parent.parent / "docs" / "CONFIG.md"
HEADER = """# Configuration keys

Every key of the run config, its default and what it means: the text of `cmaclip train --keys`,
generated from the dataclasses in `cmaclip/config.py`, `cmaclip/model/config.py` and
`cmaclip/data/config.py`. Set them in a YAML recipe (`configs/`) or on the command line as
`key.sub=value`; an unknown key is an error that names it.

```
"""


def config_doc() -> str:
    return HEADER + keys_reference().strip("\n") + "\n```\n"


def test_config_reference_matches_the_dataclasses():
    assert CONFIG_DOC.read_text() == config_doc(), "docs/CONFIG.md is stale: run .venv/bin/python tests/test_docs.py"


if __name__ == "__main__":
    CONFIG_DOC.write_text(config_doc())
