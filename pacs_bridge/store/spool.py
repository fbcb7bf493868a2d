"""Durable files: the spool of received instances, as received, byte for byte.

A file is written to a unique temp name in ``<data_dir>/tmp/``, flushed and
fsynced, then *linked* into
``<data_dir>/spool/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` only if no file
is there yet (``os.link`` fails on an existing name; it never replaces), the
temp name removed and the folder fsynced. A file in the spool is therefore
never replaced or removed by a later store: a duplicate leaves the first copy
untouched. A crash at any point leaves either no file or a whole file in the
spool; partial files can only exist in ``tmp/``. Their names start with the
node and process that write them (``<node>.<pid>.``), so that several
receiving nodes may share one data folder: at start-up a node removes only
its own partial files, those of its earlier processes that no longer run,
never another node's store in flight. A whole file that lost its database
row (a kill between link and commit) is indexed again by
``Ingestor.reconcile``.

Path components are UIDs validated against PS3.5 §9.1 (digits and dots,
at most 64 characters, no empty component, no leading zero in a
component) before they touch the file system. Every folder is created 0700
and every file 0600: the spool holds patient data.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pacs_bridge.errors import OutOfResources, RejectedInstance

__all__ = [
    "PRIVATE_DIR_MODE",
    "PRIVATE_FILE_MODE",
    "Spool",
    "StoredFile",
    "fsync_dir",
    "make_private_dir",
    "pid_alive",
    "private_umask",
    "valid_uid",
    "write_durably",
]

LOGGER = logging.getLogger(__name__)

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600

# PS3.5 §9.1: components of digits separated by dots; a component is "0" or has no leading zero.
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(value: object) -> bool:
    """True if ``value`` is a UID as PS3.5 §9.1 defines it (and so a safe path component).

    Digits and dots only, 1 to 64 characters, no empty component (no leading,
    trailing or doubled dot) and no leading zero in a multi-digit component.
    """
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


def private_umask() -> int:
    """Make every file and folder the process creates from now on private (umask 077); the old umask."""
    return os.umask(0o077)


def make_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) 0700; tighten it if it exists with wider permissions."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o077:
            path.chmod(PRIVATE_DIR_MODE)
    except OSError as exc:  # not ours (a mount point): leave it, but say so
        LOGGER.warning("cannot make folder %s private: %s", path, exc.strerror or exc)


def fsync_dir(path: Path) -> None:
    """fsync a folder so that a rename or link inside it is durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_NODE_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# A temp name that names its node and process: "<node>.<pid>.<random>.part".
_OWNED_TEMP = re.compile(r"^[A-Za-z0-9_-]+\.[0-9]+\.[^.]+\.part$")


def temp_prefix(node: str, pid: int) -> str:
    """The start of the temp names that process ``pid`` of ``node`` writes (``<node>.<pid>.``)."""
    return f"{_NODE_UNSAFE.sub('_', node)[:100] or 'node'}.{pid}."


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` runs on this host (signal 0: nothing is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_temp(chunks: Iterable[bytes], tmp_dir: Path, fsync: bool, prefix: str = "") -> tuple[str, int]:
    """Write ``chunks`` to a new private temp file in ``tmp_dir``; its name and size."""
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=prefix, suffix=".part")  # 0600, a unique name
    size = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                size += len(chunk)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
    except BaseException:
        _unlink_quietly(tmp_name)
        raise
    return tmp_name, size


def _file_chunks(path: Path, size: int = 1 << 20) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def _unlink_quietly(name: str) -> None:
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def write_durably(target: Path, chunks: Iterable[bytes], tmp_dir: Path, *, fsync: bool = True) -> int:
    """Write ``chunks`` to ``target`` through a temp file in ``tmp_dir``; return the size.

    ``target`` is replaced atomically if it exists (for files that are meant to
    be rewritten; the spool uses :meth:`Spool.store`, which never replaces).
    """
    tmp_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    target.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    tmp_name, size = _write_temp(chunks, tmp_dir, fsync)
    try:
        os.replace(tmp_name, target)
        if fsync:
            fsync_dir(target.parent)
    except BaseException:
        _unlink_quietly(tmp_name)
        raise
    return size


class _FolderSync:
    """fsync of a folder shared by the stores that need it at the same time (group commit).

    A store asks after its link is in place. An fsync that *began* after the
    link makes it durable, so a store that finds another thread's fsync
    already running waits for it and then, unless a later one has covered
    it meanwhile, runs one itself: with several associations writing into one
    study folder, each fsync covers every link made before it began.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._folders: dict[Path, tuple[threading.Lock, list[int]]] = {}

    def _state(self, folder: Path) -> tuple[threading.Lock, list[int]]:
        with self._lock:
            state = self._folders.get(folder)
            if state is None:
                if len(self._folders) > 1000:
                    self._folders.clear()  # a dropped entry only costs one fsync more
                state = self._folders[folder] = (threading.Lock(), [0, 0])  # [links made, links synced]
            return state

    def sync(self, folder: Path) -> None:
        """Return once every link made in ``folder`` before this call is durable."""
        lock, counts = self._state(folder)
        with self._lock:
            counts[0] += 1
            ticket = counts[0]
        with lock:
            if counts[1] >= ticket:
                return  # an fsync that began after our link has finished
            with self._lock:
                covered = counts[0]
            fsync_dir(folder)
            counts[1] = max(counts[1], covered)


@dataclass(frozen=True)
class StoredFile:
    """The outcome of :meth:`Spool.store`."""

    path: Path
    size: int
    created: bool
    """False when a file already had this name: it was left untouched and nothing was written."""


class Spool:
    """The folder of received instances under ``data_dir``."""

    def __init__(self, data_dir: Path, *, min_free_mb: float = 0, fsync: bool = True, node: str | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.node = node or socket.gethostname() or "node"
        self.prefix = temp_prefix(self.node, os.getpid())
        self.root = self.data_dir / "spool"
        self.tmp = self.data_dir / "tmp"
        self.failed = self.data_dir / "failed"
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)
        self.fsync = fsync
        self._folder_sync = _FolderSync()
        for folder in (self.data_dir, self.root, self.tmp):
            make_private_dir(folder)

    def clean_tmp(self) -> int:
        """Remove this node's partial files left by a crash; return how many.

        A file of this node is removed when the process that wrote it no
        longer runs (or had this process's id: a container restarted as pid 1).
        Files of other nodes are left alone: they may be stores in flight.
        Files without a node in their name come from a version that did not
        name it; they are removed.
        """
        removed = 0
        mine = temp_prefix(self.node, 0)[:-2]  # "<node>."
        for item in self.tmp.iterdir():
            if not (item.is_file() or item.is_symlink()):
                continue
            name = item.name
            if name.startswith(mine):
                pid_text = name[len(mine) :].split(".", 1)[0]
                if not pid_text.isdigit():
                    continue
                pid = int(pid_text)
                if pid != os.getpid() and pid_alive(pid):
                    continue
            elif _OWNED_TEMP.match(name):
                continue  # another node's
            item.unlink(missing_ok=True)
            removed += 1
        return removed

    def check_space(self, incoming: int = 0) -> None:
        """Raise :class:`OutOfResources` if storing ``incoming`` bytes would cross the watermark."""
        free = shutil.disk_usage(self.root).free
        if free - incoming < self.min_free_bytes:
            raise OutOfResources(
                f"free disk {free // (1024 * 1024)} MiB is below the watermark of "
                f"{self.min_free_bytes // (1024 * 1024)} MiB ([storage] min_free_mb); free space or lower it"
            )

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        """Where an instance lives; both UIDs must be valid."""
        for name, uid in (("Study Instance UID", study_uid), ("SOP Instance UID", sop_uid)):
            if not valid_uid(uid):
                raise RejectedInstance(f"{name} {str(uid)[:80]!r} is not a valid UID (PS3.5 9.1)")
        return self.root / study_uid / f"{sop_uid}.dcm"

    def store(self, study_uid: str, sop_uid: str, chunks: Iterable[bytes], size_hint: int = 0) -> StoredFile:
        """Store an instance durably unless a file already has its name.

        The bytes go to a unique temp file first; the temp file is linked to the
        spool name only if that name is free, so two stores of one instance
        racing each other never replace, truncate or remove each other's file:
        exactly one gets ``created=True``. Raises :class:`OutOfResources` when
        the disk is below the watermark or a write fails (nothing is left behind).
        """
        target = self.path_for(study_uid, sop_uid)
        self.check_space(size_hint)
        try:
            target.parent.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
            tmp_name, size = _write_temp(chunks, self.tmp, self.fsync, self.prefix)
        except OSError as exc:
            raise OutOfResources(f"cannot write {target.name}: {exc.strerror or exc}") from exc
        try:
            return self._link(tmp_name, target, size)
        finally:
            _unlink_quietly(tmp_name)

    def place(self, study_uid: str, sop_uid: str, staged: Path) -> StoredFile:
        """Store an instance whose file is already written, in this spool's ``tmp/`` folder.

        The receiver writes a C-STORE data set into ``staged`` while it
        arrives (``receive/streaming.py``). Here it is fsynced and linked to
        its spool name unless that name is taken, exactly as :meth:`store`
        does with its own temp file; ``staged`` itself is left to its writer
        to remove. A file elsewhere (another file system) is copied instead.
        """
        target = self.path_for(study_uid, sop_uid)
        self.check_space()
        if staged.parent != self.tmp:
            return self.store(study_uid, sop_uid, _file_chunks(staged), size_hint=staged.stat().st_size)
        try:
            target.parent.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
            size = staged.stat().st_size
            if self.fsync:
                fd = os.open(staged, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise OutOfResources(f"cannot write {target.name}: {exc.strerror or exc}") from exc
        return self._link(str(staged), target, size)

    def _link(self, tmp_name: str, target: Path, size: int) -> StoredFile:
        """Give the written file ``tmp_name`` the spool name ``target`` unless it is taken; make the name durable."""
        try:
            os.link(tmp_name, target)
        except FileExistsError:
            return StoredFile(target, 0, created=False)
        except OSError as exc:
            raise OutOfResources(f"cannot place {target.name}: {exc.strerror or exc}") from exc
        if self.fsync:
            try:
                self._folder_sync.sync(target.parent)
            except OSError as exc:
                # The file is whole but its name may not survive a power cut: refuse so the sender retries.
                # The file stays (a retry finds it and indexes it); nothing acknowledged depends on it yet.
                raise OutOfResources(f"cannot fsync the folder of {target.name}: {exc.strerror or exc}") from exc
        return StoredFile(target, size, created=True)

    def files(self) -> Iterable[Path]:
        """Every stored instance file."""
        return self.root.glob("*/*.dcm")
