"""Fault injection for the reliability tests and the soak benchmark (never set in normal runs).

``AERIAL_SEARCH_FAILPOINT_KILL_WORKER=FILE``: the first chunk task that runs in a distributed
worker while FILE does not exist (after ``AERIAL_SEARCH_FAILPOINT_KILL_SKIP`` earlier tasks in
that worker) creates FILE and SIGKILLs its own worker process: a deterministic worker death
mid-ingest that dask must recover from by rescheduling the task.
``AERIAL_SEARCH_FAILPOINT_HEADER_LATENCY=S`` (read in :mod:`pipeline.ingest.plan`, which must not
import this module's distributed hook): every header read first waits S seconds, in any process,
a stand-in for object storage or a network disk.
``AERIAL_SEARCH_FAILPOINT_EXIT_AFTER_BATCHES=N``: the ingest client process exits abruptly
(status 17) right after committing its N-th batch (a killed client mid-run).
``AERIAL_SEARCH_FAILPOINT_EXIT_AFTER_UNITS=N``: the process that stages its N-th unit (threads
scheduler: the client) exits abruptly (status 17) right after: a crash inside a batch.
"""

from __future__ import annotations

import os
import signal

KILL_WORKER = "AERIAL_SEARCH_FAILPOINT_KILL_WORKER"
KILL_SKIP = "AERIAL_SEARCH_FAILPOINT_KILL_SKIP"  # chunk tasks a worker runs before the kill (default 0)
_seen = [0]
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
    _seen[0] += 1
    if _seen[0] <= int(os.environ.get(KILL_SKIP, "0")):
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # already fired once
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(marker: str, skip: int = 0) -> None:
    """Arm the worker-kill failpoint in this process (call it on the workers with client.run)."""
    os.environ[KILL_WORKER] = marker
    os.environ[KILL_SKIP] = str(skip)
    _seen[0] = 0


EXIT_AFTER_UNITS = "AERIAL_SEARCH_FAILPOINT_EXIT_AFTER_UNITS"
_staged = [0]


def after_stage() -> None:
    limit = os.environ.get(EXIT_AFTER_UNITS)
    if limit is None:
        return
    _staged[0] += 1
    if _staged[0] >= int(limit):
        os._exit(17)


EXIT_AFTER_PARTS = "AERIAL_SEARCH_FAILPOINT_EXIT_AFTER_PARTS"
_parts = [0]


def after_stage_part() -> None:
    """``AERIAL_SEARCH_FAILPOINT_EXIT_AFTER_PARTS=N``: exit (17) after staging N partial units."""
    limit = os.environ.get(EXIT_AFTER_PARTS)
    if limit is None:
        return
    _parts[0] += 1
    if _parts[0] >= int(limit):
        os._exit(17)


def after_commit() -> None:
    limit = os.environ.get(EXIT_AFTER_BATCHES)
    if limit is None:
        return
    _commits[0] += 1
    if _commits[0] >= int(limit):
        os._exit(17)
