"""Reading and replacing attnpatch's small files on disk (the autotune cache) without harming anyone.

What may be at a cache path is not under attnpatch's control: another user's file, a foreign JSON
file, a newer format, a FIFO, a link to ``/dev/zero``, a huge file. The rules here:

* Read only regular files, never through a symbolic link at the last path component, opened
  non-blocking (a FIFO never hangs the reader), and at most `MAX_BYTES` (a larger file is refused).
* A file that exists but could not be read (or was not understood) is never written over: the caller
  keeps its data in memory and says so once.
* A replaced file keeps its permission bits; a file owned by another user is not replaced (that would
  change its owner); new files get the process's umask, like any file a program creates.
* Writers hold an exclusive lock (``filelock``, which comes with torch) with a timeout, merge with what is
  on disk and replace the file atomically, so concurrent processes keep each other's entries and a
  crash never leaves half a file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import stat
import tempfile
from typing import Iterator, Optional

#: Largest file read (bytes); a larger one is refused, not truncated.
MAX_BYTES = 16 << 20
#: Seconds to wait for another process's lock before giving up on a write.
LOCK_TIMEOUT_S = 5.0


class Refused(OSError):
    """A file that is there but must not be read or written; the message says why and what to do."""


def read_text(path: pathlib.Path, max_bytes: int = MAX_BYTES) -> Optional[str]:
    """The UTF-8 text of regular file ``path``; None when it does not exist. Raises `Refused` for a
    symbolic link, a FIFO, a device or other special file, a file over ``max_bytes``, a file this
    process may not read, or one that is not UTF-8."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused(f"{path} is a symbolic link; attnpatch reads only regular files there") from None
        raise Refused(f"cannot open {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused(f"{path} is not a regular file (a FIFO, device or directory); attnpatch leaves it alone")
        if st.st_size > max_bytes:
            raise Refused(f"{path} is {st.st_size} bytes, over attnpatch's limit of {max_bytes}")
        chunks = []
        left = max_bytes + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise Refused(f"{path} grew over attnpatch's limit of {max_bytes} bytes while it was read")
    except OSError as exc:
        if isinstance(exc, Refused):
            raise
        raise Refused(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Refused(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def check_replaceable(path: pathlib.Path) -> Optional[os.stat_result]:
    """The stat of the file `replace_text` would replace (None when there is none); raises `Refused`
    when it must not be replaced (not a regular file, or another user's)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"{path} is not a regular file; attnpatch will not replace it")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise Refused(f"{path} belongs to another user (uid {st.st_uid}); attnpatch will not replace it "
                      "(set ATTNPATCH_CACHE_DIR to a folder of your own)")
    return st


def replace_text(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary file in the same folder, then a rename),
    keeping the permission bits of the file it replaces. Raises `Refused` (see `check_replaceable`)
    or OSError."""
    st = check_replaceable(path)
    if st is not None:
        mode = stat.S_IMODE(st.st_mode)
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(path: pathlib.Path, timeout: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive inter-process lock on ``path`` + ".lock"; raises `Refused` when another process
    holds it for longer than ``timeout`` seconds (the caller then skips its write)."""
    from filelock import FileLock, Timeout  # a dependency of torch

    lock = FileLock(str(path.with_name(path.name + ".lock")), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise Refused(f"another process has held {path}.lock for more than {timeout:g} s") from None
    try:
        yield
    finally:
        lock.release()
