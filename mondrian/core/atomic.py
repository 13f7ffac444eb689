"""Atomic output: build beside the target, then swap it in with one rename.

Everything mondrian writes as a folder (imported models, manifests, datasets,
workspaces, adapters) goes through `atomic_folder`, and single files (reports, registry
state) through `write_text_atomic`, so a crash or kill at any moment leaves either the old
output or the new one, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a power loss cannot undo it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str, *, durable: bool = False) -> None:
    """Replace the file `path` with `text` in one rename. `durable` also fsyncs the file and
    its folder (registry state must survive a power loss; a report need not)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; this is ordinary output
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the temporary siblings of `target` that a killed writer left behind: those whose
    name carries the pid of a process that is gone. A live writer's folder (ours or another
    run's) is never touched; a folder named without a pid is left alone. The removed paths."""
    removed = []
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name[len(f".{target.name}.{kind}-"):].split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    return removed


def swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` with `tmp`. An existing target is renamed aside first and removed
    after; if the second rename fails the old target is put back."""
    if target.exists() and target.is_dir() and not any(target.iterdir()):
        target.rmdir()  # an empty folder is not worth keeping, and rename onto it is racy
    if not target.exists():
        os.replace(tmp, target)
        return
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-{os.getpid()}-", dir=target.parent))
    os.replace(target, trash / "old")
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(trash / "old", target)
        raise
    finally:
        shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of `target` to fill. When the block succeeds the
    folder replaces `target`; when it raises (or the process dies) `target` is untouched
    and the temporary folder is removed (or left hidden, dot-prefixed, after a kill)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the result is ordinary output
        swap_in(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
