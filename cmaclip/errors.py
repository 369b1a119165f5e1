"""One error boundary for every command: a known failure is one line and a non-zero exit; a
traceback is for bugs (or on request: `--debug` on any command, or CMACLIP_DEBUG=1).

Known failures are the CmaclipError family (raised with a message that names the file, key or row),
OSError (I/O: the line names the path and the free space there, so a full disk reads as one), and
Ctrl-C. Under a launcher every rank may fail at once: rank 0 reports at once; another rank waits a
moment first, since the launcher stops every rank once one fails, so its line appears only when it
alone failed (then it names itself).
"""
from __future__ import annotations

import errno
import faulthandler
import functools
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

DEBUG_FLAG = "--debug"
DEBUG_ENV = "CMACLIP_DEBUG"
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # the shell's code for "stopped by SIGINT"
EXIT_TERMINATED = 143  # ... and for SIGTERM
# Set by the trainer's stop request: a later failure (a collective whose peer the launcher has
# already stopped) is then a consequence of that signal, not a bug.
received_signal: str | None = None
# How long a rank other than 0 waits before reporting (the launcher's monitor polls every 0.1-5 s).
OTHER_RANK_GRACE_S = 8.0


class CmaclipError(Exception):
    """A failure the user can act on (input, config, data, environment): reported as one line."""

    exit_code = EXIT_ERROR


class DataError(CmaclipError, ValueError):
    """A shards folder, shard, index or sample that cannot be used; the message names the file."""


class DiskError(CmaclipError, OSError):
    """A write that failed (disk full, quota, permissions); the message names the path and the
    free space there."""


def free_space(path: str | Path) -> str:
    """Free space on the filesystem holding `path` (or its nearest existing parent), e.g. "1.2 GiB"."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024:
            return f"{free:.1f} {unit}" if unit != "B" else f"{free} B"
        free /= 1024
    return f"{free:.1f} TiB"


def disk_error(path: str | Path, error: BaseException) -> DiskError:
    """`error` raised while writing `path`, as one line with the free space there."""
    reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
    return DiskError(f"writing {path} failed: {reason} ({free_space(path)} free there)")


def error_line(error: BaseException) -> str:
    """The one line for a known error."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(error, OSError) and not isinstance(error, CmaclipError) and error.filename is not None:
        reason = error.strerror or str(error)
        where = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
        line = f"{where}: {reason}"
        if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO):
            line += f" ({free_space(error.filename)} free there)"
        return line
    return str(error) or type(error).__name__


def is_known(error: BaseException) -> bool:
    return isinstance(error, (CmaclipError, OSError, KeyboardInterrupt))


def report(prog: str, error: BaseException) -> int:
    """Print the line (rank 0 at once, another rank after a grace period) and return the exit code."""
    rank = int(os.environ.get("RANK", "0") or 0)
    prefix = f"{prog}: " if rank == 0 else f"{prog} (rank {rank}): "
    if rank != 0:
        # the launcher ends this rank with SIGTERM once another rank has failed: die quietly then
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        time.sleep(OTHER_RANK_GRACE_S)
    line = prefix + error_line(error)
    print(line, file=sys.stderr, flush=True)
    tell_launcher(line)
    return EXIT_INTERRUPTED if isinstance(error, KeyboardInterrupt) else getattr(error, "exit_code", EXIT_ERROR)


def tell_launcher(line: str) -> None:
    """torchrun's agent (inside `accelerate launch`) prints a failure summary of its own; given
    this file, its "Root Cause" shows our line instead of a pointer to its docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            Path(path).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        except OSError:
            pass


def enable_faulthandler() -> None:
    """A crash in native code (DALI, a library) still prints where it happened."""
    try:
        faulthandler.enable(file=sys.__stderr__)
    except (AttributeError, OSError, ValueError):  # no real stderr (embedded, some test captures)
        pass


def command(prog: str):
    """Decorator for a command's `main(argv=None)`: strips `--debug` from argv and turns known
    errors into one line and a non-zero exit."""

    def decorate(main):
        @functools.wraps(main)
        def run(argv=None):
            argv = list(sys.argv[1:] if argv is None else argv)
            enable_faulthandler()
            if DEBUG_FLAG in argv:
                argv = [arg for arg in argv if arg != DEBUG_FLAG]
                os.environ[DEBUG_ENV] = "1"  # child processes (ablate's trainings) inherit it
            try:
                return main(argv)
            except BaseException as error:
                if os.environ.get(DEBUG_ENV) == "1":
                    raise
                if received_signal is not None and not is_known(error):
                    rank = os.environ.get("RANK", "0")
                    line = (f"{prog} (rank {rank}): stopped by {received_signal} before the next checkpoint "
                            f"(another rank failed, or the job was cancelled); then: {error_line(error)[:200]}")
                    print(line, file=sys.stderr, flush=True)
                    tell_launcher(line)
                    sys.exit(EXIT_TERMINATED)
                if not is_known(error):
                    raise
                sys.exit(report(prog, error))

        return run

    return decorate
