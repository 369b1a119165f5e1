"""One run per output_dir: rank 0 holds `output_dir/LOCK` while it trains.

Two runs writing into one folder would replace each other's checkpoints and model without a word.
The lock file names its holder (host, pid, Slurm job); it is removed when the run ends, however it
ends short of a kill -9. A lock left by a process that is gone is stale and taken over when the
holder is known dead: same host and no such pid, or the same Slurm job (a requeued job restarts
after its previous incarnation ended, perhaps on other nodes).
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from cmaclip.checkpoint import LOCK_FILE
from cmaclip.config import ConfigError
from cmaclip.errors import CmaclipError


class RunLockError(CmaclipError):
    """Another run holds the output_dir."""


def this_holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    return True


def is_stale(holder: dict, me: dict) -> bool:
    if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"]:
        return True
    return holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", 0)))


def acquire(output_dir: str | Path, log=print) -> Path:
    """Create output_dir (if needed) and its lock, or raise RunLockError naming the holder."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} is a file, not a folder")
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_FILE
    me = this_holder()
    for _ in range(2):  # a second try after removing a stale lock
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            if not isinstance(holder, dict) or not holder:
                raise RunLockError(f"{path} exists but cannot be read: if no run uses {output_dir}, delete it") from None
            if not is_stale(holder, me):
                raise RunLockError(
                    f"{output_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}"
                    f"{', Slurm job ' + holder['slurm_job'] if holder.get('slurm_job') else ''}, since "
                    f"{holder.get('since')}): choose another output_dir, or delete {path} if that run is gone") from None
            log(f"removed a stale lock {path} (pid {holder.get('pid')} on {holder.get('host')} is gone)")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(descriptor, "w") as file:
            json.dump(me, file)
        return path
    raise RunLockError(f"{path}: another run took the lock while a stale one was being removed")


def release(path: Path) -> None:
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


@contextmanager
def held(output_dir: str | Path, is_main_process: bool, log=print):
    """Hold the lock for the body on the main process; other ranks do nothing."""
    path = acquire(output_dir, log) if is_main_process else None
    try:
        yield
    finally:
        if path is not None:
            release(path)
