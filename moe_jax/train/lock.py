"""An exclusive lock on a run's working directory, so two runs cannot write one workdir at once.

Two runs on one workdir would both append to ``metrics.jsonl`` (every row doubled) and race on checkpoints.
The lock is ``fcntl.flock`` on ``WORKDIR/.lock``: the kernel drops it when the holding process exits, however
it exits (SIGKILL, a crash, a lost preemptible VM), so a dead run never leaves it stuck and there is no
stale-pid guessing. The file itself is never deleted (unlinking a lock file lets a third process lock a fresh
inode while a second still holds the old one); on release only its content -- the holder's pid and start
time, kept for the refusal message -- is cleared.

Notes:
    ``flock`` locks belong to the open file description: a second ``WorkdirLock`` on the same workdir in the
    same process is refused too, and a child forked (not exec'd) while the lock is held keeps it until it
    exits. On network file systems without ``flock`` support the lock cannot be taken and the run is refused
    with the cause, rather than run unprotected. In a multi-host run, take it on one process only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time

from moe_jax.errors import ConfigError

LOCK_NAME = ".lock"


class WorkdirLock:
    """``with WorkdirLock(workdir): ...`` holds an exclusive lock on ``workdir`` for the block.

    Args:
        workdir: the run's working directory (it must exist); the lock file is ``workdir/.lock``.

    Raises (on entering):
        ConfigError: another live process holds the lock (one line naming its pid and start time), or the lock
            file cannot be created or locked (naming the path and the cause).
    """

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
        self.path = os.path.join(self.workdir, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Takes the lock or raises :class:`ConfigError`; see the class docstring."""
        if self._fd is not None:
            raise RuntimeError(f"WorkdirLock({self.workdir!r}) is already held by this object")
        try:
            # O_CLOEXEC (Python's default): a subprocess the run starts does not inherit the lock.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(
                f"--workdir={self.workdir}: cannot create or open the lock file {self.path} ({_cause(e)}); "
                "pass a --workdir you can write"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            holder = _read_holder(fd) if busy else None
            os.close(fd)
            if busy:
                raise ConfigError(
                    f"another run ({_describe(holder)}) is using --workdir={self.workdir}; "
                    "wait for it to finish or pass another --workdir"
                ) from None
            raise ConfigError(
                f"--workdir={self.workdir}: cannot lock {self.path} ({_cause(e)}); pass a --workdir on a "
                "local file system"
            ) from None
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        record = {"pid": os.getpid(), "started": started, "host": socket.gethostname()}
        # Holding the lock is what matters; the record only improves the refusal message, so a full disk here
        # is left to be reported where the run first writes something that matters.
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Clears the holder record and drops the lock; a no-op when not held."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def __del__(self):
        # A lock object dropped without release (an exception before ``with``) must not keep the fd open.
        if getattr(self, "_fd", None) is not None:
            self.release()


def _read_holder(fd: int) -> dict | None:
    """The holder's record; waits briefly because the holder writes it just after it takes the lock."""
    deadline = time.monotonic() + 0.5
    while True:
        try:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            record = json.loads(text)
            if isinstance(record, dict) and "pid" in record:
                return record
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "pid unknown"
    text = f"pid {holder.get('pid')}"
    host = holder.get("host")
    if host and host != socket.gethostname():
        text += f" on host {host}"
    if holder.get("started"):
        text += f", started {holder['started']}"
    return " ".join(text.split())  # the record is data from a file: keep the message on one line


def _cause(e: OSError) -> str:
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno == errno.ENOSPC:
        return "disk full"
    if e.errno == errno.ENOTDIR:
        return "a part of the path is a file, not a directory"
    if e.errno == errno.ENOENT:
        return "the directory does not exist"
    return e.strerror or type(e).__name__
