"""A local output dir: one writer per manifest under flock, images made durable before their lines."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from ..errors import OutputError, OutputLocked
from ..record import Record
from .files import FD_LIMIT, Jail, output_error
from .ledger import Ledger, encode_event, ledger_name, ledger_paths, read_ledger
from .manifest import (
    IMAGE_FILE,
    SPEC_SNAPSHOT,
    TORN_SUFFIX,
    ResumeState,
    image_intact,
    index_lines,
    index_name,
    index_valid,
    manifest_name,
    read_snapshot,
    rebuild_index,
    repair,
    scan,
)

_SCRATCH = re.compile(r"^\.scratch-(\d+)-[A-Za-z0-9_]+$")  # Store.scratch_dir's folders
_TEMP = re.compile(r"^\..+\.(\d+)(?:-\d+)?\.tmp$")  # .<name>.<pid>-<n>.tmp, as Jail.atomic names them


class LocalStore:
    """The output directory of one run (one shard): lock, images, inputs, manifest.

    Durability: an image is written to a temp file, fsynced, renamed into place and its
    folder fsynced before its manifest line is written; manifest lines are written in
    batches, each fsynced. With `durable=False` the fsyncs
    are skipped: a killed process still loses nothing (the kernel has the bytes), a power
    cut may. Nothing is ever written through a symlink (see files.Jail)."""

    remote = False
    upkeep_s = 0.0  # flock needs no upkeep

    def __init__(self, path: Path, shard: tuple[int, int] | None = None, durable: bool = True) -> None:
        self.path = path
        self.display = str(path)
        self.durable = durable
        self.shard = shard
        self.shard_label = f"{shard[0]}-of-{shard[1]}" if shard else None
        self.manifest_name = manifest_name(self.shard_label)
        self.manifest_path = path / self.manifest_name
        self.ledger_name = ledger_name(self.shard_label)
        self.jail = Jail(path)
        self._lock_fds: list[int] = []
        self._manifest: int | None = None
        self._index: int | None = None
        self._offset = 0
        self.repaired_bytes = 0
        self.damaged_lines = 0
        self.removed_temps = 0
        self.warnings: list[str] = []

    # -- life cycle -------------------------------------------------------------------------
    def open(self) -> None:
        try:
            self.jail.dir_fd("images", create=True)
            self._lock()
            self._check_own_files()
            self.repaired_bytes = repair(self.jail, self.manifest_name)
            repair(self.jail, self.ledger_name)  # a kill mid-event: the torn tail is set aside, never glued to
            if self.jail.lstat(self.manifest_name) is not None and not index_valid(self.manifest_path):
                self.damaged_lines = rebuild_index(self.jail, self.manifest_name, self.durable)
            self._manifest = self.jail.open(self.manifest_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            self._offset = os.fstat(self._manifest).st_size
            self._index = self.jail.open(index_name(self.manifest_name), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError as e:
            self.close()
            raise output_error(e, self.display) from None
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self._manifest, self._index):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._manifest = self._index = None
        while self._lock_fds:
            os.close(self._lock_fds.pop())
        self.jail.close()

    def upkeep(self) -> str | None:
        return None

    def _lock(self) -> None:
        """One writer per manifest. flock is released by the kernel when the process dies, so a
        crash never leaves a lock stuck. Shards share `.lock` (an unsharded run takes it alone,
        so it never runs beside shards) and each holds its own shard's lock alone; shards of
        different N at once would overlap, so each N holds `.lock.of-N` and refuses others."""
        if self.shard is None:
            self._take(".lock", fcntl.LOCK_EX, "another runner (or --shard runs)")
            return
        self._take(".lock", fcntl.LOCK_SH, "an unsharded runner")
        count = self.shard[1]
        self._take(f".lock.of-{count}", fcntl.LOCK_SH, "")
        for entry in os.scandir(self.jail.dir_fd("")):
            m = re.fullmatch(r"\.lock\.of-(\d+)", entry.name)
            if m and int(m.group(1)) != count and self._held(entry.name):
                raise OutputLocked(
                    f"{self.display} is in use by shards of --shard K/{m.group(1)}; shards of different N on one "
                    f"output dir would buy the same items twice: use /{m.group(1)}, or wait for them to finish"
                )
        self._take(f".lock.shard-{self.shard_label}", fcntl.LOCK_EX, f"another runner of shard {self.shard_label}")

    def _check_own_files(self) -> None:
        """Where runner's own files belong, anything but a regular file is refused, not used."""
        for name in (
            self.manifest_name,
            self.manifest_name + TORN_SUFFIX,
            index_name(self.manifest_name),
            self.ledger_name,
            SPEC_SNAPSHOT,
        ):
            st = self.jail.lstat(name)
            if st is not None and not stat.S_ISREG(st.st_mode):
                what = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise OutputError(
                    f"{self.jail.path(name)} is {what}; runner never reads or writes through anything but its own "
                    "files in an output dir: remove it"
                )

    def _held(self, name: str) -> bool:
        fd = self.jail.open(name, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _take(self, name: str, mode: int, who: str) -> None:
        fd = self.jail.open(name, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            pid = f" (pid {holder})" if holder.isdigit() else ""
            raise OutputLocked(
                f"{self.display} is in use by {who}{pid}; wait for it to finish or choose another --out"
            ) from None
        if mode == fcntl.LOCK_EX:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fds.append(fd)

    # -- resume -----------------------------------------------------------------------------
    def scan(self, verify: bool, images: bool = False) -> ResumeState:
        root = str(self.path)  # a plain string: a Path per image made resume twice as slow
        state = scan(self.path, lambda rec: image_intact(root, rec, verify), images)
        state.add_ledger(self.ledger())
        return state

    def ledger(self) -> Ledger:
        """Every batch the output dir's ledgers know (all shards')."""
        return read_ledger(ledger_paths(self.path))

    def append_ledger(self, event: dict[str, Any]) -> None:
        """One batch event, appended and fsynced before this returns: what it says survives a kill."""
        try:
            fd = self.jail.open(self.ledger_name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            try:
                data = encode_event(event)
                if os.write(fd, data) != len(data):
                    raise OSError(errno.ENOSPC, "short write", self.ledger_name)
                os.fsync(fd)  # always, --no-fsync or not: a batch lost from here is paid for twice
            finally:
                os.close(fd)
        except OSError as e:
            raise output_error(e, self.display) from None

    def orphans(self, state: ResumeState) -> dict[int, list[str]]:
        """Image files named by an item id that has no ok record (a kill between saving an image
        and writing its line leaves them): adoption candidates, {id: [paths]}. Temp files of
        dead processes are removed on the way, and a link among the image folders is refused."""
        found: dict[int, list[str]] = {}
        try:
            for top in ("images", "inputs"):
                if self.jail.lstat(top) is None:
                    continue
                for folder in os.scandir(self.jail.dir_fd(top)):
                    if not folder.is_dir(follow_symlinks=False):
                        if folder.is_symlink():
                            raise OSError(errno.ELOOP, "a symbolic link", f"{self.display}/{top}/{folder.name}")
                        continue
                    rel = f"{top}/{folder.name}"
                    with self.jail.folder(rel) as fd:  # not kept open: 256 folders may be more than ulimit -n
                        for entry in os.scandir(fd):
                            name = entry.name
                            if name.startswith("."):
                                self._remove_temp(fd, name)
                            elif (
                                top == "images"
                                and (m := IMAGE_FILE.fullmatch(name))
                                and (key := int(m.group(1), 16)) not in state.done
                                and key not in state.bad_images
                                and entry.is_file(follow_symlinks=False)
                            ):
                                found.setdefault(key, []).append(f"{rel}/{name}")
            for entry in os.scandir(self.jail.dir_fd("")):
                if entry.name.startswith("."):
                    self._remove_temp(self.jail.dir_fd(""), entry.name)
        except OSError as e:
            raise output_error(e, self.display) from None
        return found

    def scratch_dir(self) -> Path:
        """A fresh private folder inside the output dir for big temporary files (a batch's requests
        and results: gigabytes belong on the output's disk, not in /tmp), named so that nothing can
        be planted there first; a dead run's is removed by the next one."""
        for entry in os.scandir(self.jail.dir_fd("")):
            m = _SCRATCH.match(entry.name)
            if m and not _alive(int(m.group(1))) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(self.jail.path(entry.name), ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".scratch-{os.getpid()}-", dir=self.path))

    def _remove_temp(self, dir_fd: int, name: str) -> None:
        m = _TEMP.match(name)
        legacy = name == f".{self.manifest_name}.idx.tmp"  # older runners named the index's temp without a pid
        if not legacy and (m is None or _alive(int(m.group(1)))):
            return
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dir_fd)
            self.removed_temps += 1

    def read_image(self, rel: str) -> bytes | None:
        try:
            return self.jail.read(rel)
        except OSError as e:
            if e.errno in FD_LIMIT:  # not "no image": the save path holds it and tries again
                raise output_error(e, self.display) from None
            return None

    # -- writing ----------------------------------------------------------------------------
    def save_image(self, rel: str, data: bytes) -> tuple[str, int | None]:
        """Write one image atomically and durably (file and folder fsynced); (sha256, mtime_ns)."""
        try:
            st = self.jail.write_atomic(rel, data, self.durable)
            if self.durable:
                self.jail.sync_dir(rel.rpartition("/")[0])
        except OSError as e:
            raise output_error(e, self.display) from None
        return hashlib.sha256(data).hexdigest(), st.st_mtime_ns

    def save_input(self, rel: str, source: str, size: int) -> None:
        """Keep a copy of a reference image (content-addressed: each file once)."""
        try:
            st = self.jail.lstat(rel)
        except OSError as e:
            raise output_error(e, self.display) from None
        if st is not None and st.st_size == size:
            return
        try:
            data = Path(source).read_bytes()
        except OSError as e:
            if e.errno in FD_LIMIT:
                raise output_error(e, self.display) from None
            raise OutputError(f"cannot read reference image {source}: {e.strerror or e}") from None
        self.save_image(rel, data)

    def append(self, records: list[Record], lines: list[bytes], now: bool = False) -> None:
        """Append manifest lines as one write, then fsync: a batch commit.

        The resume index follows, unsynced: it is a cache that a crash can leave behind,
        and the next run rebuilds it from the manifest then."""
        assert self._manifest is not None and self._index is not None, "open() first"
        payload = b"".join(lines)
        try:
            written = os.write(self._manifest, payload)
            if written != len(payload):
                raise OSError(errno.ENOSPC, "short write", str(self.manifest_path))
            if self.durable:
                os.fsync(self._manifest)
            os.write(self._index, index_lines(records, self._offset, [len(line) for line in lines]))
            self._offset += written
        except OSError as e:
            raise output_error(e, self.display) from None

    def read_snapshot(self) -> dict[str, Any]:
        """What the dir remembers of the spec it last ran (spec.json), or {}."""
        return read_snapshot(self.path)

    def write_snapshot(self, summary: dict[str, Any]) -> None:
        try:
            self.jail.write_atomic(SPEC_SNAPSHOT, json.dumps(summary, indent=2).encode(), self.durable)
        except OSError as e:
            raise output_error(e, self.display) from None


def local_holders(out: Path) -> dict[str, dict[str, Any]]:
    """Which runners hold the dir's locks, as this machine's /proc/locks says (without taking a lock,
    which could refuse a runner starting at that moment): {lease key: {running, renewed, holder}}."""
    try:
        text = Path("/proc/locks").read_text()
        entries = list(os.scandir(out))
    except OSError:
        return {}
    held: dict[tuple[int, int, int], str] = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[1] == "FLOCK" and "->" not in fields:
            with contextlib.suppress(ValueError):
                major, minor, inode = fields[5].split(":")
                held[(int(major, 16), int(minor, 16), int(inode))] = fields[3]
    found: dict[str, dict[str, Any]] = {}
    for entry in entries:
        m = re.fullmatch(r"\.lock(?:\.shard-(\d+-of-\d+))?", entry.name)
        if m is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        mode = held.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
        running = mode is not None if m.group(1) else mode == "WRITE"  # shards hold `.lock` shared
        found[f"shard-{m.group(1)}" if m.group(1) else "all"] = {"running": running, "renewed": None, "holder": ""}
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
