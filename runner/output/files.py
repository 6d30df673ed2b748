"""Files inside an output dir, never reached through a symlink: a dir fd per folder, O_NOFOLLOW, O_EXCL temps."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import OutputError

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC
_TEMP_SEQ = itertools.count()
_DIR = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW


FD_LIMIT = (errno.EMFILE, errno.ENFILE)  # too many open files: in this process, or in the whole system


def output_error(e: OSError, where: str) -> OutputError:
    """An OSError in the output dir as the one-line error a person can act on (its errno kept)."""
    name = getattr(e, "filename", None) or where
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        why, short = "the disk is full (or a file-size quota was reached)", "disk full"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why, short = "no permission to write there", "no permission"
    elif e.errno in (errno.ELOOP, errno.ENOTDIR):
        why = "it is a symbolic link (or not a folder); runner never follows links inside its output dir: remove it"
        short = "a link in the output dir"
    elif e.errno in FD_LIMIT:
        from ..fdlimit import describe

        why = short = describe()
    else:
        why = short = e.strerror or str(e)
    error = OutputError(
        f"cannot write to output dir {where}: {why} ({name}); the run stopped, what was written is intact"
    )
    error.errno, error.why = e.errno, short
    return error


class Jail:
    """Opens and writes files under `root` without following a symlink anywhere below it.

    The root itself may be a link (out -> /mnt/big/out is a user's choice); every folder
    below it is opened with O_NOFOLLOW relative to its parent's fd, and files are opened
    relative to their folder's fd, so a link planted in a shared output dir can neither
    redirect a write nor make a truncation hit a file outside. Non-regular files (a FIFO
    where the index belongs) are refused instead of hanging a reader."""

    max_cached = 320  # folder fds kept open at most (fdlimit lowers it under a tight ulimit -n)

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[str, int] = {}

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    def path(self, rel: str) -> str:
        return f"{self.root}{os.sep}{rel}" if rel else str(self.root)

    def dir_fd(self, rel: str, create: bool = False) -> int:
        """The fd of folder `rel` ("" is the root), made if `create`; cached."""
        fd = self._dirs.get(rel)
        if fd is not None:
            return fd
        if not rel:
            if create:
                self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            parent, _, name = rel.rpartition("/")
            pfd = self.dir_fd(parent, create)
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=pfd)
            fd = os.open(name, _DIR, dir_fd=pfd)
        cached = self._dirs.setdefault(rel, fd)  # two threads may open one folder at once: one fd is kept
        if cached != fd:
            os.close(fd)
        return cached

    def _hold(self, rel: str, create: bool = False) -> tuple[int, bool]:
        """(the fd of folder `rel`, whether the caller closes it): a cached fd, or, once `max_cached`
        folders are open, one of its own (an output dir has 256 image folders, and a tight
        `ulimit -n` cannot hold them all)."""
        fd = self._dirs.get(rel)
        if fd is not None:
            return fd, False
        if not rel or len(self._dirs) < self.max_cached:
            return self.dir_fd(rel, create), False
        parent, _, name = rel.rpartition("/")
        pfd, close_parent = self._hold(parent, create)
        try:
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o755, dir_fd=pfd)
            return os.open(name, _DIR, dir_fd=pfd), True
        finally:
            if close_parent:
                os.close(pfd)

    @contextlib.contextmanager
    def folder(self, rel: str, create: bool = False) -> Iterator[int]:
        """The fd of folder `rel` for the length of the block (see _hold)."""
        fd, close = self._hold(rel, create)
        try:
            yield fd
        finally:
            if close:
                os.close(fd)

    def open(self, rel: str, flags: int, mode: int = 0o644) -> int:
        """An fd of the regular file `rel` (OSError ELOOP for a link, EINVAL-like for a FIFO)."""
        folder, _, name = rel.rpartition("/")
        dfd, close = self._hold(folder, bool(flags & os.O_CREAT))
        try:
            fd = os.open(name, flags | _NOFOLLOW | os.O_NONBLOCK, mode, dir_fd=dfd)
        finally:
            if close:
                os.close(dfd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file", self.path(rel))
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def lstat(self, rel: str) -> os.stat_result | None:
        folder, _, name = rel.rpartition("/")
        try:
            with self.folder(folder) as dfd:
                return os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes | memoryview, durable: bool) -> os.stat_result:
        """Write `rel` whole or not at all (see atomic); returns the new file's stat."""
        with self.atomic(rel, durable) as fd:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            st = os.fstat(fd)  # fsync and rename leave size and mtime as they are
        return st

    @contextlib.contextmanager
    def atomic(self, rel: str, durable: bool) -> Iterator[int]:
        """An fd to write `rel` through: a fresh O_EXCL temp file beside it, renamed into place
        when the block ends (fsynced first if `durable`), removed if it fails.

        The folder itself is not fsynced (see sync_dir): a batch of files shares one folder
        fsync before their manifest lines are written."""
        folder, _, name = rel.rpartition("/")
        dfd, close = self._hold(folder, create=True)
        try:
            tmp = f".{name}.{os.getpid()}-{next(_TEMP_SEQ)}.tmp"  # unique per write: threads may write one name
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW
            try:
                fd = os.open(tmp, flags, 0o644, dir_fd=dfd)
            except FileExistsError:  # a leftover of ours, or something planted: removed, never written through
                os.unlink(tmp, dir_fd=dfd)
                fd = os.open(tmp, flags, 0o644, dir_fd=dfd)
            try:
                yield fd
                if durable:
                    os.fsync(fd)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
            os.close(fd)
            os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)  # replaces a planted link itself, not its target
        finally:
            if close:
                os.close(dfd)

    def sync_dir(self, rel: str) -> None:
        fd, close = self._hold(rel)
        try:
            os.fsync(fd)
        finally:
            if close:
                os.close(fd)

    def read(self, rel: str, limit: int | None = None) -> bytes:
        fd = self.open(rel, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            return f.read() if limit is None else f.read(limit)


def open_regular(path: Path | str) -> int:
    """A read-only fd of a regular file, not through a final symlink, never blocking on a FIFO."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


@contextlib.contextmanager
def atomic_file(path: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """Write `path` whole or not at all, never through a link at the temp name or the target: every
    file runner writes goes through here or through a Store (gallery, export, card, caches)."""
    jail = Jail(path.parent)
    try:
        with jail.atomic(path.name, durable) as fd, os.fdopen(os.dup(fd), "wb") as f:
            yield f
    finally:
        jail.close()


def append_file(path: Path) -> BinaryIO:
    """`path` opened for appending, created if missing, never through a link."""
    jail = Jail(path.parent)
    try:
        return os.fdopen(jail.open(path.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab")
    finally:
        jail.close()
