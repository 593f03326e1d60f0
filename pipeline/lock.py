"""Single writer per store: a lock file beside the store that survives a crashed holder.

The lock is ``.<store name>.lock`` next to the store, created atomically (``O_EXCL``) and holding
the holder's host, pid, the process's start time and boot id, the time it was taken and a random
token. The holder refreshes its modification time after every commit. A lock is stale, and is
taken over, when its holder ran on this host and that process is gone (a pid now used by
another process, recognised by its start time, counts as gone), or when it has not been
refreshed for ``stale_after`` seconds (any host). Release removes the file only while it still
holds this holder's token, so a holder that was taken over never removes its successor's lock.
Object-storage stores have no such primitive here; they are written without a lock (the deploy
docs say to run one ingest per store there) and the upkeep commands refuse them.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path

from pipeline.errors import StoreError
from pipeline.locations import is_remote


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


def process_start(pid: int) -> str:
    """When process ``pid`` started (clock ticks since boot, with the boot id), or "" where
    /proc does not tell: what tells a live process from another one that reused a dead pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
    return f"{boot}:{stat.rsplit(')', 1)[1].split()[19]}"  # field 22, after the command name


class StoreLock:
    """``with StoreLock(path):`` ... raises StoreError if another live writer holds it.

    ``what`` names the holder's work in the message a second writer gets (an ingest, a compact).
    """

    def __init__(self, store: Path | str, stale_after: float = 3600.0, what: str = "ingest"):
        self.remote = is_remote(store)
        self.path = None if self.remote else lock_path(store)
        self.stale_after = stale_after
        self.what = what
        self.token = uuid.uuid4().hex

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
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid", -1))
            if not _alive(pid):
                return True
            started = holder.get("started", "")
            if started and process_start(pid) not in ("", started):
                return True  # the pid was reused by another process: the holder is gone
        return age > self.stale_after

    def acquire(self) -> None:
        if self.path is None:
            return
        me = json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "started": process_start(os.getpid()),
            "since": time.time(), "token": self.token, "what": self.what,
        })  # fmt: skip
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
                    f"({holder.get('what', 'ingest')}) since {since}; wait for it to finish "
                    f"(or remove {self.path} if that process is gone)"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            return
        raise StoreError(f"could not take the lock {self.path}")

    def held(self) -> bool:
        """Whether the lock file still holds this holder's token."""
        return self.path is not None and self._holder().get("token") == self.token

    def refresh(self) -> None:
        if self.path is not None and self.held():
            os.utime(self.path)

    def release(self) -> None:
        if self.path is not None and self.held():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
