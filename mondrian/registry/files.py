"""Filesystem steps a publish needs beyond core.atomic: copy-and-hash, removing a killed
publish's read-only folder, and rename-without-replace."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import sys
from pathlib import Path

_CHUNK = 1 << 20


def copy_hashed(src: Path, dst: Path) -> str:
    """Copy and hash in one pass: the card's sha256 is of the bytes written, even if the
    source changes meanwhile. fsync so a power loss cannot leave a renamed-in empty file."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        while chunk := fi.read(_CHUNK):
            h.update(chunk)
            fo.write(chunk)
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()


def force_rmtree(path: Path) -> None:
    """Remove a (possibly read-only) temp folder left by a killed publish."""
    for root, _dirs, _files in os.walk(path):
        try:
            os.chmod(root, 0o700)
        except OSError:
            pass
    shutil.rmtree(path, ignore_errors=True)


_libc = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails if `dst` exists. Plain rename silently replaces an *empty*
    directory, so use renameat2(RENAME_NOREPLACE) / renamex_np(RENAME_EXCL) where available;
    elsewhere the advisor lock plus an existence check covers it."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    call = None
    if sys.platform.startswith("linux") and hasattr(_libc, "renameat2"):
        at_fdcwd, noreplace = -100, 1
        def call():
            return _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace)
    elif sys.platform == "darwin" and hasattr(_libc, "renamex_np"):
        def call():
            return _libc.renamex_np(os.fsencode(src), os.fsencode(dst), 0x4)  # RENAME_EXCL
    if call is not None:
        if call() == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(dst))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # flag unsupported: fall back
            raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)
