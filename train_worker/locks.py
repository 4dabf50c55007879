"""Process locks on `$ENGRAIN_HOME/locks/*.lock`: `fcntl` locks die with their holder, so none goes stale."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from types import TracebackType


class ProcessLock:
    """A non-blocking exclusive lock that records its holder's pid for messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        """True when another process holds the lock right now."""
        if self._fd is not None:
            return False
        if self.acquire():
            self.release()
            return False
        return True

    def holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

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


def worker_lock(locks: Path) -> ProcessLock:
    return ProcessLock(locks / "worker.lock")


def host_lock(locks: Path) -> ProcessLock:
    return ProcessLock(locks / "host.lock")


def watcher_lock(locks: Path) -> ProcessLock:
    return ProcessLock(locks / "watch.lock")
