"""Single writer per store: a lock file beside the store that survives a crashed holder.

The lock is ``.<store name>.lock`` next to the store, created atomically (``O_EXCL``) and holding
the holder's host, pid and start time. The holder refreshes its modification time after every
committed batch. A lock is stale, and is taken over, when its holder ran on this host and that
process is gone, or when it has not been refreshed for ``stale_after`` seconds (any host).
Object-storage stores have no such primitive here; they are written without a lock (the
deploy docs say to run one ingest per store there).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.store import is_remote


def lock_path(store: Path | str) -> Path:
    store = Path(store)
    return store.with_name(f".{store.name}.lock")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreLock:
    """``with StoreLock(path):`` ... raises StoreError if another live ingest holds it."""

    def __init__(self, store: Path | str, stale_after: float = 3600.0):
        self.remote = is_remote(store)
        self.path = None if self.remote else lock_path(store)
        self.stale_after = stale_after

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return True
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return True
        return age > self.stale_after

    def acquire(self) -> None:
        if self.path is None:
            return
        me = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if self._stale(holder):
                    self.path.unlink(missing_ok=True)  # a crashed writer's lock: take it over
                    continue
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
                raise StoreError(
                    f"store {self.path.name[1:-5]} is being written by pid {holder.get('pid')} on {holder.get('host')} "
                    f"since {since}; wait for that ingest to finish (or remove {self.path} if that process is gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return
        raise StoreError(f"could not take the lock {self.path}")

    def refresh(self) -> None:
        if self.path is not None:
            os.utime(self.path)

    def release(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
