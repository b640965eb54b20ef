"""One writer per output: a lock file beside the directory, naming the process that holds it.

Two `train` processes writing one run directory interleave their metrics and mix their
checkpoints; two `preprocess` runs into one directory race on its rename. The lock file sits
beside the directory (``.NAME.lock``), so that `--overwrite` replacing the directory keeps it.
A lock left by a process of this host that no longer exists is taken over, with a message.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from glm_portable.atomic import process_alive
from glm_portable.errors import UserError


def lock_path(directory: Path) -> Path:
    return Path(directory).parent / f".{Path(directory).name}.lock"


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


@contextmanager
def exclusive(directory: Path, what: str) -> Iterator[None]:
    """Hold ``directory``'s lock while the block runs; a UserError names the holder if another process has it."""
    lock = lock_path(directory)
    lock.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not process_alive(pid):
                print(f"{what}: taking over the lock of process {pid}, which has ended ({lock})", file=sys.stderr)
                lock.unlink(missing_ok=True)
                continue
            raise UserError(f"{directory}: {what} is already being written by process {pid} on {host} since "
                            f"{holder.get('since')} ({lock}); wait for it to finish, or use another directory") from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        break
    try:
        yield
    finally:
        if _holder(lock).get("pid") == me["pid"]:
            lock.unlink(missing_ok=True)
