"""Write a file or a directory under a temporary name and rename it when complete.

A crash, a kill or an exception never leaves something at the final path that looks finished.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from glm_portable.errors import UserError


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a hidden sibling, then rename it over ``path``: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def refuse_to_replace(out_dir: Path, overwrite: bool) -> None:
    """The check ``atomic_directory`` makes, for commands that want to fail before their long work."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir}: exists and is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{out_dir}: exists and is not empty (use --overwrite to replace it)")


def _partial_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.partial-{socket.gethostname()}-"


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that pid exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out_dir: Path) -> list[Path]:
    """Temporary siblings of ``out_dir`` left by processes of this host that died before renaming them."""
    prefix = _partial_prefix(out_dir)
    removed = []
    for sibling in out_dir.parent.glob(f"{glob.escape(prefix)}*"):
        pid = sibling.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(sibling, ignore_errors=True)
            removed.append(sibling)
    return removed


@contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out_dir``, on failure it is removed.

    An existing non-empty ``out_dir`` is replaced only with ``overwrite``, and then only once the new
    one is complete: the old one is moved aside, the new one renamed into place, the old one deleted,
    so a crash leaves the old or the new output (at worst the old one under a ``.old-`` name), never
    neither. Temporary directories of dead processes are cleaned up first.
    """
    out_dir = Path(out_dir)
    refuse_to_replace(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_partial_prefix(out_dir)}{os.getpid()}-", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}") if out_dir.exists() else None
        if old is not None:
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
