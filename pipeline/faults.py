"""Fault injection for the reliability tests and the soak benchmark (never set in normal runs).

``AERIAL_SEARCH_FAILPOINT_KILL_WORKER=FILE``: the first chunk task that runs in a distributed
worker after FILE is gone creates FILE and SIGKILLs its own worker process (a deterministic
worker death mid-ingest: dask must reschedule the task elsewhere).
``AERIAL_SEARCH_FAILPOINT_EXIT_AFTER_BATCHES=N``: the ingest client process exits abruptly
(status 17) right after committing its N-th batch (a killed client mid-run).
"""

from __future__ import annotations

import os
import signal

KILL_WORKER = "AERIAL_SEARCH_FAILPOINT_KILL_WORKER"
EXIT_AFTER_BATCHES = "AERIAL_SEARCH_FAILPOINT_EXIT_AFTER_BATCHES"
_commits = [0]


def maybe_kill_worker() -> None:
    marker = os.environ.get(KILL_WORKER)
    if not marker:
        return
    try:
        from distributed import get_worker

        get_worker()
    except (ImportError, ValueError):
        return  # not in a distributed worker: nothing to kill
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # already fired once
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def after_commit() -> None:
    limit = os.environ.get(EXIT_AFTER_BATCHES)
    if limit is None:
        return
    _commits[0] += 1
    if _commits[0] >= int(limit):
        os._exit(17)
