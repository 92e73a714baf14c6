"""One writer per eval folder: an OS lock on ``DIR/eval.lock``, held for a run's life.

:func:`acquire` opens (creating it if need be) ``DIR/eval.lock`` and takes an exclusive,
non-blocking :func:`fcntl.flock` on it. The lock belongs to the open file, so the operating
system drops it when the process ends, however it ends: a normal return, an exception,
``os._exit``, ``kill -9``. When the lock is free, the new holder writes who it is into the file
(one JSON line: ``pid``, ``host``, ``started``, and for a torchrun job ``torchelastic_run_id``,
``master`` and ``world_size``). When another process holds it, :func:`acquire` raises
:class:`FolderBusy`, whose message names the folder and the holder's pid, host and start time
as the holder wrote them; nothing in the folder is written.

Stale locks need no detection of their own: the file is only a place to hang the OS lock on
and a note of the last holder. A lock file left by a dead process (a killed run: the file
exists and names a pid no longer running) holds no lock, so the next run takes it at once
and overwrites the note. The file is never deleted (deleting it would let two processes lock
two different files of the same name); :meth:`FolderLock.release` empties it.

The descriptor is close-on-exec, so programs the run starts do not keep the folder locked;
a child forked without exec (multiprocessing's ``fork``) shares the lock until it exits. On a
filesystem without ``flock`` (some network filesystems), :func:`acquire` returns an unheld lock
whose :attr:`~FolderLock.unsupported` says why, and the caller decides (``eval`` warns and
runs unguarded). NFS clients on Linux map ``flock`` to NFS byte-range locks, which do work
across nodes.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

__all__ = ["LOCK_NAME", "FolderBusy", "FolderLock", "acquire", "holder_info", "describe_holder"]

LOCK_NAME = "eval.lock"
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}
_BUSY = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}


class FolderBusy(RuntimeError):
    """Another process holds the folder's lock (the message names the folder and the holder)."""

    def __init__(self, folder: Path, holder: dict | None):
        self.folder, self.holder = folder, holder
        super().__init__(f"{folder} is in use by another tts-kernels eval ({describe_holder(holder)}); "
                         f"wait for it to finish or use another --out")


def holder_info() -> dict:
    """What this process writes into the lock file it holds."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        info["torchelastic_run_id"] = os.environ["TORCHELASTIC_RUN_ID"]
    if os.environ.get("MASTER_ADDR"):
        info["master"] = f"{os.environ['MASTER_ADDR']}:{os.environ.get('MASTER_PORT', '')}"
    if os.environ.get("WORLD_SIZE"):
        info["world_size"] = int(os.environ["WORLD_SIZE"])
    return info


def describe_holder(holder: dict | None) -> str:
    if not holder or "pid" not in holder:
        return "holder unknown: its lock file names no process"
    text = f"pid {holder['pid']} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"
    job = holder.get("torchelastic_run_id") or holder.get("master")
    if job:
        text += f", torchrun job {job} of {holder.get('world_size', '?')} ranks"
    return text


class FolderLock:
    """A held (or, on a filesystem without locks, unheld) lock on ``path``; release it once."""

    def __init__(self, path: Path, fd: int | None, unsupported: str | None = None):
        self.path, self.fd, self.unsupported = path, fd, unsupported

    @property
    def held(self) -> bool:
        return self.fd is not None

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)  # nobody holds it now; the next holder writes its own note
        except OSError:
            pass
        finally:
            os.close(fd)  # drops the flock

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode("utf-8", "replace"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


def _holder(fd: int, wait: float = 1.0) -> dict | None:
    """The note of the process holding the lock. A holder that has just taken it may not have
    written its note yet (the file is empty, or still names a dead earlier holder): read again
    for up to ``wait`` seconds before settling for what is there."""
    deadline = time.monotonic() + wait
    while True:
        info = _read(fd)
        fresh = info is not None and "pid" in info and (info.get("host") != socket.gethostname()
                                                        or _alive(info["pid"]))
        if fresh or time.monotonic() >= deadline:
            return info
        time.sleep(0.05)


def acquire(folder: Path, info: dict | None = None) -> FolderLock:
    """Lock ``folder`` (which must exist) for this process, or raise :class:`FolderBusy` without
    writing anything. ``info`` (default :func:`holder_info`) is written into the lock file."""
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in _BUSY:
            holder = _holder(fd)
            os.close(fd)
            raise FolderBusy(Path(folder), holder) from None
        os.close(fd)
        if exc.errno in _UNSUPPORTED:
            return FolderLock(path, None, unsupported=f"cannot lock {path}: {exc.strerror}")
        raise
    try:
        note = (json.dumps(info if info is not None else holder_info()) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
    except BaseException:
        os.close(fd)
        raise
    return FolderLock(path, fd)
