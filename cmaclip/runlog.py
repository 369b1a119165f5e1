"""output_dir/train.log: a run's notices, kept next to its checkpoints.

Rank 0 writes, through `logging`, what a later reader of the folder needs: the start, the
parameter counts, resume notices, evaluation summaries, skipped non-finite steps, a stop on a
signal and the error a run ended with. Every start of the run appends to the same file. The
progress display (bar or step lines) stays on stdout only; other ranks write nothing.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

from cmaclip.checkpoint import TRAIN_LOG
from cmaclip.errors import error_line

log = logging.getLogger("cmaclip.run")
log.setLevel(logging.INFO)
log.propagate = False  # the terminal shows the run already; a configured root logger must not repeat it
log.addHandler(logging.NullHandler())  # ranks other than 0 (and library use) write nowhere


@contextmanager
def writing(output_dir: str | Path, is_main_process: bool):
    """On the main process `log` appends to output_dir/train.log for the body (which output_dir must
    exist for), ending with the error that ends the body, if any; other ranks: nothing."""
    if not is_main_process:
        yield
        return
    handler = logging.FileHandler(Path(output_dir) / TRAIN_LOG, encoding="utf-8")
    formatter = logging.Formatter("%(asctime)sZ %(levelname)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    log.addHandler(handler)
    try:
        yield
    except BaseException as error:
        log.error(f"stopped: {error_line(error)}")
        raise
    finally:
        log.removeHandler(handler)
        handler.close()
