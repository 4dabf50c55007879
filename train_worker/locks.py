"""Process locks on `$ENGRAIN_HOME/locks/*.lock`: `fcntl` locks die with their holder, so none goes stale.

Lock files are opened with `O_NOFOLLOW` (a symlink planted in their place is refused, never followed
and truncated) and mode 0600; only a holder writes its pid into one, so checking a lock changes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType


class LockFileError(Exception):
    """A lock file cannot be opened safely (it is a symlink, or not ours to open)."""


def open_lock_file(path: Path) -> int:
    """Open (creating it 0600) a lock file without following a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockFileError(
                f"lock file {path} is a symbolic link; engrain never follows one there. Remove it and retry."
            ) from exc
        raise LockFileError(f"cannot open lock file {path}: {exc.strerror or exc}") from exc


class ProcessLock:
    """An exclusive lock that records its holder's pid for messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, *, timeout: float = 0.0) -> bool:
        """Take the lock, waiting up to `timeout` seconds (0: try once); True when held."""
        fd = open_lock_file(self.path)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.01)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock right now; the file is left as it was."""
        if self._fd is not None:
            return False
        fd = open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we took
        return False

    def holder(self) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return int(os.read(fd, 32).decode().strip() or 0) or None
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def __enter__(self) -> ProcessLock:
        if not self.acquire():
            raise LockHeld(self)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class LockHeld(Exception):
    def __init__(self, lock: ProcessLock) -> None:
        pid = lock.holder()
        super().__init__(f"{lock.path.name} is held by {'pid ' + str(pid) if pid else 'another process'}")
        self.lock = lock
        self.pid = pid


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock at `path` for the block, waiting as long as it takes (for short critical sections)."""
    fd = open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def worker_lock(locks: Path) -> ProcessLock:
    return ProcessLock(locks / "worker.lock")


def host_lock(locks: Path) -> ProcessLock:
    return ProcessLock(locks / "host.lock")


def watcher_lock(locks: Path) -> ProcessLock:
    return ProcessLock(locks / "watch.lock")


def dispatch_lock(locks: Path) -> ProcessLock:
    """Serialises request, cancel and reconcile across every MCP server on one home."""
    return ProcessLock(locks / "dispatch.lock")
