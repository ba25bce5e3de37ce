"""Crash-safe file writes: write a temp file next to the target, fsync, then rename over it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` can only be read by setting it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            # mkstemp creates the file owner-only; give it the permissions a plain open() would.
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not supported on every filesystem
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | Path, data: Any) -> None:
    # Serialise before touching the disk: a value that cannot be written leaves the old file as it was.
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def build_dir_atomically(target: Path, write: Callable[[Path], None], complete: Callable[[Path], bool]) -> None:
    """Have ``write`` fill a temp dir beside ``target``, then rename it into place: a crash or a parallel
    builder never leaves a half-written ``target``. ``complete(dir)`` tells a finished dir from a leftover."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it owner-only; the cache may be shared
        write(tmp)
        if target.exists() and not complete(target):
            shutil.rmtree(target, ignore_errors=True)  # left over from a crash
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; its copy is identical
            if not complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
