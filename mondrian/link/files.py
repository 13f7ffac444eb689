"""Read a file a job record names, without letting the record stop the run.

A record can name anything: a FIFO (open() would block forever), a socket, a device, a
symlink loop, a path through a plain file (`plain.json/inner.json`), a 5,000-character name,
a 2 GB sparse file. Each of these is one record's problem, so each becomes a `FileProblem`
with a kind the linker maps to that record's rejection reason; nothing here raises anything
else for a bad path.

Only regular files are opened, after `stat`, with O_NONBLOCK (a FIFO swapped in after the
check still cannot block) and O_NOFOLLOW (the caller passes a real path: a symlink swapped in
after resolution is refused), and the opened file is checked again with `fstat`.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image

_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

_KINDS = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a unix socket", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISDIR: "a folder", stat.S_ISLNK: "a symlink"}


class FileProblem(Exception):
    """Why a named file cannot be read. `kind`: missing | folder | special | too_large | unreadable."""

    def __init__(self, kind: str, detail: str):
        super().__init__(kind, detail)
        self.kind, self.detail = kind, detail


def _what(mode: int) -> str:
    return next((name for test, name in _KINDS.items() if test(mode)), "not a regular file")


def check_regular(st: os.stat_result, label: str, limit: int) -> None:
    """A FileProblem unless `st` is a regular file of at most `limit` bytes."""
    if stat.S_ISDIR(st.st_mode):
        raise FileProblem("folder", f"{label} is a folder")
    if not stat.S_ISREG(st.st_mode):
        raise FileProblem("special", f"{label} is {_what(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise FileProblem("too_large", f"{label} is {st.st_size:,} bytes (limit {limit:,})")


def file_stat(real: str, label: str) -> os.stat_result:
    """`stat` of `real`, every OSError turned into a FileProblem naming `label`."""
    try:
        return os.stat(real)
    except (FileNotFoundError, NotADirectoryError):  # ENOTDIR: a path through a plain file
        raise FileProblem("missing", f"{label} does not exist") from None
    except OSError as exc:  # ELOOP, ENAMETOOLONG, EACCES, ...
        raise FileProblem("unreadable", f"{label}: {exc.strerror or exc}") from None


def read_regular(real: str, label: str, limit: int) -> bytes:
    """The bytes of the regular file `real` (at most `limit`), or a FileProblem."""
    check_regular(file_stat(real, label), label, limit)
    try:
        fd = os.open(real, _FLAGS)
    except OSError as exc:  # swapped for a symlink, or a permission problem
        raise FileProblem("unreadable", f"{label}: {exc.strerror or exc}") from None
    try:
        check_regular(os.fstat(fd), label, limit)  # what we opened, not what we stat'ed before
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:  # EIO, EAGAIN from a file that is not what it claimed
        raise FileProblem("unreadable", f"{label}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if size > limit:  # grew after the stat
        raise FileProblem("too_large", f"{label} is over {limit:,} bytes")
    return b"".join(chunks)


@contextmanager
def pil_pixel_limit(limit: int) -> Iterator[None]:
    """Make Pillow's own bomb check follow our limit, not its 89.5 Mpx default (it warns above
    MAX_IMAGE_PIXELS and raises above twice that). Process-wide while it lasts; the linker is
    single-threaded."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old
