"""A kernel's adapter versions on disk, and the `current` symlink that says which one serves.

`kernels/<name>/versions/vN/` holds one adapter; `kernels/<name>/current` points at `versions/vN`
(no link: the bare base model). The link is switched with an atomic rename, under a per-kernel
`fcntl` lock shared by the worker (deploy) and the server (rollback). Torch-free.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import Set as AbstractSet
from pathlib import Path

from train_worker.locks import locked
from train_worker.protocol import VersionMeta, fsync_dir, read_model
from train_worker.settings import Layout

log = logging.getLogger(__name__)

_VERSION_DIR = re.compile(r"^v([1-9][0-9]*)$")


class DeployError(Exception):
    pass


class KernelFiles:
    # A version folder holding this file is never pruned (the server marks converged versions so).
    KEEP_MARKER = "KEEP"

    def __init__(self, layout: Layout, kernel: str) -> None:
        self.kernel = kernel
        self.root = layout.kernel_dir(kernel)
        self.versions_dir = self.root / "versions"
        self.current_link = self.root / "current"
        self._lock_path = layout.locks / f"kernel-{kernel}.lock"

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Serialise deploys, rollbacks and late cancels of this kernel across processes."""
        return locked(self._lock_path)

    def version_dir(self, version: int) -> Path:
        return self.versions_dir / f"v{version}"

    def versions(self) -> list[int]:
        """Complete versions on disk (a folder with its meta.json), oldest first."""
        if not self.versions_dir.is_dir():
            return []
        found = []
        for child in self.versions_dir.iterdir():
            match = _VERSION_DIR.fullmatch(child.name)
            if match and (child / "meta.json").is_file():
                found.append(int(match.group(1)))
        return sorted(found)

    def current(self) -> int | None:
        try:
            target = os.readlink(self.current_link)
        except FileNotFoundError:
            return None
        match = _VERSION_DIR.fullmatch(Path(target).name)
        if not match:
            raise DeployError(f"{self.current_link} points at {target!r}, which is not a version folder")
        return int(match.group(1))

    def meta(self, version: int) -> VersionMeta:
        return read_model(self.version_dir(version) / "meta.json", VersionMeta)

    def next_version(self) -> int:
        """One past every version ever made, including staged or pruned folders, so numbers never repeat."""
        highest = 0
        if self.versions_dir.is_dir():
            for child in self.versions_dir.iterdir():
                match = re.match(r"^\.?v([1-9][0-9]*)", child.name)
                if match:
                    highest = max(highest, int(match.group(1)))
        return highest + 1

    def install(self, staged: Path, version: int) -> Path:
        """Move a fully written staging folder into place as `versions/vN`."""
        if not (staged / "meta.json").is_file():
            raise DeployError(f"{staged} has no meta.json; write the adapter and its meta before installing")
        target = self.version_dir(version)
        if target.exists():
            raise DeployError(f"{target} already exists; version numbers are never reused")
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        os.rename(staged, target)
        fsync_dir(self.versions_dir)
        return target

    def switch(self, version: int | None) -> None:
        """Point `current` at `versions/vN` (None: remove it, serving the bare base) atomically."""
        if version is not None and version not in self.versions():
            raise DeployError(f"kernel {self.kernel!r} has no complete version v{version} on disk")
        self.root.mkdir(parents=True, exist_ok=True)  # a kernel that never deployed has no folder yet
        if version is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.current_link)
            fsync_dir(self.root)
            return
        tmp = self.root / f".current.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(f"versions/v{version}", tmp)
        os.replace(tmp, self.current_link)
        fsync_dir(self.root)

    def rollback_target(self) -> int | None:
        """What rollback_kernel() without a version serves: the newest version before the current one."""
        current = self.current()
        earlier = [v for v in self.versions() if current is None or v < current]
        return earlier[-1] if earlier else None

    def prune(self, keep: int, protect: AbstractSet[int] = frozenset()) -> list[int]:
        """Delete all but the newest `keep` versions; never the current one, its rollback target, a version
        marked KEEP (converged), or one in `protect`."""
        current = self.current()
        versions = self.versions()
        marked = {v for v in versions if (self.version_dir(v) / self.KEEP_MARKER).exists()}
        keepers = set(versions[-keep:]) | protect | marked
        keepers |= {v for v in (current, self.rollback_target()) if v is not None}
        removed = []
        for version in versions:
            if version in keepers:
                continue
            shutil.rmtree(self.version_dir(version), ignore_errors=True)
            removed.append(version)
        if removed:
            log.info("kernel %s: pruned versions %s", self.kernel, removed)
        return removed
