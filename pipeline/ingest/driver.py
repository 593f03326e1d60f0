"""The ingest driver: plans the sources against the store (headers read concurrently), computes
batches of images on the runtime with a bounded number in flight (no barrier between them), and
commits each batch's statuses as soon as its chunks are written. Progress goes to stderr, one
line every few seconds when stderr is not a terminal.

- A new store is built in a hidden sibling folder (``.NAME.partial``) and swapped into place
  when every image is done; ``--overwrite`` replaces an existing store the same way.
- An existing store is extended in place: new images are added, unchanged ones (same path,
  size and modification time) skipped, changed ones re-ingested under a new image id with
  their old tiles invalidated. Searches see an image only once its status is ``done``.
- Work is committed per batch of images (about ``store.batch_tiles`` slots): rerunning after a
  crash redoes only unfinished images.
- A file that cannot be read is reported and recorded (status ``failed``) and the run goes on,
  unless ``strict``. One ingest per store at a time (:class:`~pipeline.lock.StoreLock`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import multiprocessing
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import faults, locations, raster, resources, schema, stac, store
from pipeline.backbones import ModelSpec
from pipeline.cluster import runtime
from pipeline.config import Config
from pipeline.dates import DateSources
from pipeline.embed import Runner, describe_weights
from pipeline.errors import ConfigError, RasterError, StoreError
from pipeline.ingest import graph, plan, staging
from pipeline.lock import StoreLock
from pipeline.progress import Progress

log = logging.getLogger(__name__)


@dataclass
class IngestReport:
    """What an ingest did; printed by the CLI and returned by the API."""

    store: str
    images: int  # images in the store after this run
    windows: int  # windows of this run's fingerprinted images
    tiles: int  # of which kept
    dropped: int
    seconds: float
    scheduler: str
    weights_id: str
    processed: int = 0  # images fingerprinted by this run
    skipped: int = 0  # unchanged images already in the store
    replaced: int = 0  # changed images re-ingested (their old tiles invalidated)
    dated: int = 0  # images already in the store given an acquisition time by this run (--dates, --date-pattern, STAC)
    empty_images: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), also in the store

    @property
    def tiles_per_second(self) -> float:
        return self.tiles / self.seconds if self.seconds > 0 else float("nan")

    def __str__(self) -> str:
        lines = [
            f"store        {self.store}",
            f"images       {self.processed} fingerprinted, {self.skipped} unchanged, {self.replaced} replaced, "
            f"{len(self.failed)} failed, {len(self.empty_images)} too small for a window; {self.images} in the store",
            f"windows      {self.windows} ({self.tiles} kept, {self.dropped} dropped as >50% nodata)",
            f"time         {self.seconds:.1f} s ({self.tiles_per_second:.1f} tiles/s) on {self.scheduler}",
            f"weights      {self.weights_id}",
        ]
        if self.dated:
            lines.insert(2, f"dates        {self.dated} image(s) already in the store dated or re-dated")
        lines += [f"FAILED       {p}: {why}" for p, why in self.failed]
        return "\n".join(lines)


def ingest(
    sources: Iterable[str | os.PathLike[str]],
    store_path: str | os.PathLike[str],
    config: Config | None = None,
    *,
    overwrite: bool = False,
    strict: bool = False,
    client: Any = None,
    batch_tiles: int | None = None,
    dates: DateSources | None = None,
    asset: str | None = None,
) -> IngestReport:
    """Fingerprint every window of ``sources`` into the store at ``store_path`` (see the module
    docstring for what happens to existing stores, failures and crashes).

    ``client``: an existing ``distributed.Client`` (otherwise ``config.cluster`` decides).
    ``dates``: where acquisition times come from beyond the TIFF tag (:mod:`pipeline.dates`); a
    STAC source (:mod:`pipeline.stac`) among ``sources`` adds its items' times and ids;
    ``asset``: the key of the items' asset to ingest (default their first RGB GeoTIFF).
    """
    cfg = config or Config()
    sources, dates = stac.expand(sources, dates or DateSources(), asset)
    final = locations.check_writable(store_path)
    if cfg.read.decoder == "device" and client is None and cfg.cluster.scheduler in LOCAL_KINDS:
        _require_device_decoding(cfg, None)  # before any store is touched
    try:
        return _ingest(sources, final, cfg, overwrite, strict, client, batch_tiles, dates)
    except OSError as e:  # disk full, read-only or vanished storage: say so, and that work is kept
        raise StoreError(
            f"writing store {final} failed: {e.strerror or e} ({e.filename or ''}); free space or fix permissions "
            f"on that storage, then rerun the same command: finished images are kept and it resumes"
        ) from e


def _ingest(
    sources, final, cfg: Config, overwrite: bool, strict: bool, client: Any, batch_tiles: int | None,
    dates: DateSources,
) -> IngestReport:
    remote = locations.is_remote(final)
    with StoreLock(final, what="ingest") as lock:
        paths = raster.expand_sources(sources)
        if not paths:
            raise RasterError(
                f"no images found in {list(map(str, sources))}: pass image files (GeoTIFF, JPEG, PNG), folders of them or a .txt list"
            )
        weights = describe_weights(cfg.model.arch, cfg.model.weights, cfg.model.seed)
        if not weights["pretrained"]:
            warnings.warn(f"ingesting with {weights['weights_id']}", stacklevel=3)
        existing = locations.exists(final) and not overwrite
        work = final if (existing or remote) else locations.partial_path(final)
        if overwrite:
            if remote:
                locations.discard(final)
            elif locations.exists(work):
                locations.discard(work)
        t0 = time.perf_counter()
        with runtime(cfg.cluster, client=client) as rt:
            if cfg.read.decoder == "device":
                _require_device_decoding(cfg, rt.client)
            threads = cfg.model.torch_threads or rt.torch_threads  # an explicit setting wins
            spec = ModelSpec.from_config(cfg.model, weights["weights_sha256"], torch_threads=threads)
            attrs = schema.schema_attrs(cfg, spec.arch, spec.dim, weights)
            have_store = locations.exists(work)
            if have_store:
                if not locations.is_store(work):
                    raise StoreError(f"{work} exists and is not a fingerprint store; choose another --store path")
                store.check_version(work)
                prior = store.read_attrs(work)  # once: on object storage each read is a request
                diff = schema.signature_diff(prior, attrs)
                if "mode" in diff or "context_px" in diff:
                    was = prior.get("model", {})
                    flags = f"--mode {was.get('mode', 'exact')}"
                    flags += f" --context-px {was['context_px']}" if was.get("context_px") is not None else ""
                    raise StoreError(
                        f"store {final} was ingested with {flags} and this run asks for --mode {cfg.model.mode}"
                        f"{f' --context-px {cfg.model.context_px}' if cfg.model.mode == 'dense' else ''}; "
                        f"exact and dense fingerprints never mix in one store: pass {flags} or use another --store"
                    )
                if diff:
                    raise StoreError(
                        f"store {final} holds fingerprints made differently ({diff}); fingerprints of different "
                        f"models, weights or preprocessing never mix in one store: use another --store"
                    )
                cfg = _store_layout(cfg, prior, final)
                table = store.read_table(work)
            else:
                table = store.empty_table()
            if rt.client is None:
                _warm_up(spec)  # torch's import and the model build run beside the header reads
            headers = _check_sources(paths, cfg, rt, remote=any(raster.is_uri(p) for p in paths))
            usable = [h.info for h in headers if h.info is not None]
            cfg = _decoder(cfg, prior if have_store else None, final, rt, usable)
            attrs = schema.schema_attrs(cfg, spec.arch, spec.dim, weights)  # with the resolved decoder
            found = plan.sort_sources(headers, table, strict)
            plan.report_notes([h for h in headers if h.info is not None])
            failures = list(found.failures)
            if failures and not (found.new or found.redo or found.skipped):
                raise RasterError("no source could be used:\n" + "\n".join(why for _, why in failures))
            # before the store is touched: a date the user gave that is no date stops the run here.
            # Images to fingerprint take every source; those already in the store only the
            # explicit ones (their tag was read when they came in).
            fresh = {i.path for i in found.new} | {i.path for _, i in found.redo}
            known = [h.info for h in headers if h.info is not None]
            tags = [i.datetime_tag if i.path in fresh else "" for i in known]
            acquired = dict(zip([i.path for i in known], dates.resolve([i.path for i in known], tags, fresh)))
            if not have_store:
                store.create_store(work, attrs, spec.dim, cfg.store.dtype, cfg.store.chunk_tiles, cfg.store.compressor)
            n_images, n_slots = len(table["image_path"]), int(table["n_tiles"])
            per_batch = batch_tiles or cfg.store.batch_tiles or 8 * cfg.store.chunk_tiles
            plans, batches, n_tiles = plan.allocate(
                found.new, n_images, n_slots, cfg.store.chunk_tiles, cfg.read.chunk_px, per_batch
            )
            if plans:
                store.grow(work, max(n_tiles, n_slots), n_images + len(plans))
                store.write_rows(work, np.array([p.image_id for p in plans]),
                                 plan.table_rows(plans, found.hashes, acquired, dates.items))  # fmt: skip
            dated = 0
            if have_store and dates.explicit():
                dated = _redate(work, table, {p: a for p, a in acquired.items() if p not in fresh}, dates.items)
            for _path, why in failures:  # files that could not even be opened: reported, not in the table
                warnings.warn(f"skipped {why}", stacklevel=3)
            old_plans = [
                plan.plan_images([info], cfg.read.chunk_px, i, int(table["tile_start"][i]))[0] for i, info in found.redo
            ]
            batches += plan.regroup(old_plans, cfg.store.chunk_tiles, per_batch)
            replaced_of = {plans[k].image_id: old for k, old in found.replaces.items()}
            done, failed = _run_batches(work, batches, cfg, spec, rt, strict, replaced_of, lock)
            failures += failed
            store.set_attrs(
                work,
                last_ingest={
                    "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "failed": [{"path": p, "reason": why} for p, why in failures],
                },
            )
            scheduler = rt.describe()
        if work != final:
            locations.swap_in(work, final)
    seconds = time.perf_counter() - t0
    ran = {p.image_id for p in plans} | {i for i, _ in found.redo}
    all_plans = {p.image_id: p for p in [*plans, *old_plans]}
    valid = store.read_valid(final)
    slots = np.concatenate([np.arange(p.tile_start, p.tile_stop) for i, p in all_plans.items() if i in done]
                           or [np.zeros(0, np.int64)])  # fmt: skip
    return IngestReport(
        store=str(final),
        images=len(store.read_table(final)["image_path"]),
        windows=int(len(slots)),
        tiles=int(valid[slots].sum()),
        dropped=int((~valid[slots]).sum()),
        seconds=seconds,
        scheduler=scheduler,
        weights_id=weights["weights_id"],
        processed=len([i for i in ran if i in done]),
        skipped=found.skipped,
        replaced=len([i for i in replaced_of if i in done]),
        empty_images=[p.info.path for p in plans if not p.tile_count],
        failed=failures,
        dated=dated,
    )


def _warm_up(spec: ModelSpec) -> threading.Thread:
    """Build this process's model in the background (importing torch takes seconds) while
    headers and the first chunks are read; the local schedulers' fingerprint tasks wait for it
    (the model cache's lock). A failure is left for the first task to raise."""

    def build() -> None:
        with contextlib.suppress(Exception):
            Runner(spec)

    thread = threading.Thread(target=build, name="aerial-search-warm-up", daemon=True)
    thread.start()
    return thread


HEADERS_PER_TASK = 512  # header reads per cluster or process task
CLUSTER_HEADERS_FROM = 10_000  # local lists shorter than this are read by the client
# Fast local lists go to a process per core when reading them in this process would take longer
# than this: starting the processes (spawn, imports) costs about a second on 2 cores, so UC
# Merced's 2,100 JPEG headers (0.2-0.3 ms each) are quicker here (0.4-0.7 s against 1.2-1.4 s
# through the processes), 10,000 GeoTIFF chips (0.8 ms each) quicker there.
PROCESS_AFTER_S = 2.0
SLOW_HEADER_S = 0.005  # a header read slower than this is waiting on storage, not on the CPU


LOCAL_KINDS = ("threads", "sync", "local", "local-cuda")  # runtimes whose workers see this machine's GPUs


def _workers_decode_on_device(cfg: Config, client: Any) -> bool:
    """Whether the model runs on a GPU that every worker can decode on (:func:`pipeline.decode.available`)."""
    from pipeline import decode

    if cfg.model.device == "cpu" and not os.environ.get(decode.DEVICE_ENV):
        return False
    if client is None:
        return decode.available()
    answers = client.run(decode.available)
    return bool(answers) and all(answers.values())


def _require_device_decoding(cfg: Config, client: Any) -> None:
    if not _workers_decode_on_device(cfg, client):
        where = "this machine" if client is None else "the cluster's workers"
        raise ConfigError(
            f"--decoder device (read.decoder: device) needs a CUDA GPU for the model on {where}, and torch sees "
            f"none{' (or --device cpu was given)' if cfg.model.device == 'cpu' else ''}: run on GPU workers, or "
            f"use --decoder auto (the CPU decoders)"
        )


def _recorded_decoder(attrs: dict[str, Any]) -> str:
    """The decoder that made a store: ``auto`` in stores from before ``auto`` was resolved meant
    today's ``pillow``; no record at all, GDAL (stores older than the setting)."""
    was = attrs.get("config", {}).get("read", {}).get("decoder", "gdal")
    return "pillow" if was == "auto" else was


def _decoder(cfg: Config, prior: dict[str, Any] | None, final: Any, rt: Any, infos: list[raster.ImageInfo]) -> Config:
    """``cfg`` with ``read.decoder`` resolved once for this ingest, which the store records.

    ``auto``: ``device`` when the workers decode on a GPU and some source decodes there
    (:func:`pipeline.decode.support`), else ``pillow``. A grown store keeps the decoder that made
    its fingerprints: a store grown with another decoder would hold two decodes of the same kind
    of file (chroma-subsampled JPEGs differ at colour edges), and a file ingested again would not
    reproduce its own fingerprints. With ``device``, the files that decode on the CPU are
    reported, one line per reason with a count of files."""
    from pipeline import decode

    asked = cfg.read.decoder
    t = cfg.tiling
    reasons = {i.path: decode.support(i.path, t.bands, t.scale, i.masked, i.count, i.dtype) for i in infos}
    chosen = asked
    if asked == "auto":
        device_ok = any(r is None for r in reasons.values()) and _workers_decode_on_device(cfg, rt.client)
        chosen = "device" if device_ok else "pillow"
    if prior is not None:
        was = _recorded_decoder(prior)
        if was != chosen:
            warnings.warn(
                f"store {final} was read with read.decoder: {was}; this run reads with {was} too, so that every "
                f"file in the store is decoded the same way (for read.decoder: {chosen}, use another --store)",
                stacklevel=4,
            )
            if was == "device" and asked != "device":
                _require_device_decoding(cfg, rt.client)
            chosen = was
    if chosen == "device":
        fallback: dict[str, int] = {}
        for why in reasons.values():
            if why is not None:
                fallback[why] = fallback.get(why, 0) + 1
        on_device = sum(r is None for r in reasons.values())
        log.info("read.decoder device: %d file(s) decode on the GPU", on_device)
        for why, n in sorted(fallback.items(), key=lambda kv: -kv[1]):
            warnings.warn(f"read.decoder device: {n} file(s) decoded on the CPU instead: {why}", stacklevel=4)
    return cfg.override(**{"read.decoder": chosen})


def _store_layout(cfg: Config, attrs: dict[str, Any], final: Any) -> Config:
    """``cfg`` with the layout the store was made with (``store.chunk_tiles``, ``read.chunk_px``).
    A tile's slot follows from its image's chunk_px (grid chunks row-major), and search looks
    slots up with the store's recorded chunk_px: new images laid out with another one could not
    be found by uid. Batches start on the store's Zarr chunks, which a write task must own whole;
    a run's own chunk_tiles padded each batch to its chunks (8,192 slots by default)."""
    layout = attrs.get("layout") or {}
    keep = {"store.chunk_tiles": layout.get("chunk_tiles"), "read.chunk_px": layout.get("chunk_px")}
    keep = {k: int(v) for k, v in keep.items() if v is not None}
    run = {"store.chunk_tiles": cfg.store.chunk_tiles, "read.chunk_px": cfg.read.chunk_px}
    differ = {k: v for k, v in keep.items() if run[k] != v}
    if not differ:
        return cfg
    flags = " ".join(f"--{k.split('.')[1].replace('_', '-')} {v}" for k, v in differ.items())
    warnings.warn(f"store {final} was laid out with {flags}; this run adds images with the same layout (its tiles "
                  f"must stay findable by uid)", stacklevel=4)  # fmt: skip
    return cfg.override(**differ)


def _check_sources(paths: list[str], cfg: Config, rt: Any, remote: bool) -> list[plan.Header]:
    """Every source's header, concurrently, in the way the storage allows.

    Object storage and long lists on a cluster: tasks of ``HEADERS_PER_TASK`` reads on the
    workers. Otherwise the first reads tell: waiting on storage (object storage, a network disk)
    means ``read.header_threads`` threads; a fast local disk means the CPU is the limit, and
    GDAL's opens do not scale with threads in one process (measured: 32 threads were slower than
    1), so lists that would take longer than ``PROCESS_AFTER_S`` go to one process per core.
    """
    kwargs = {**plan.config_kwargs(cfg), "threads": cfg.read.header_threads}
    if rt.client is not None and (remote or len(paths) >= CLUSTER_HEADERS_FROM):
        return [h for part in rt.map(partial(plan.check_sources, **kwargs), _batches(paths)) for h in part]
    if remote:
        return plan.check_sources(paths, **kwargs)
    # The first read pays the process's GDAL start-up (imports, driver registration: ~0.1 s),
    # which would pass a local disk off as slow storage; the next 16 are timed.
    first = plan.check_sources(paths[:1], **{**kwargs, "threads": 1})
    probe = min(len(paths), 17)
    t0 = time.perf_counter()
    first += plan.check_sources(paths[1:probe], **{**kwargs, "threads": 1})
    per_header = (time.perf_counter() - t0) / max(probe - 1, 1)
    if per_header > SLOW_HEADER_S:
        return first + plan.check_sources(paths[probe:], **kwargs)
    rest = paths[probe:]
    cores = resources.cpu_count()
    if per_header * len(rest) < PROCESS_AFTER_S or cores < 2:
        return first + plan.check_sources(rest, **{**kwargs, "threads": 1})
    one_each = partial(plan.check_sources, **{**kwargs, "threads": 1})
    try:
        with ProcessPoolExecutor(cores, mp_context=multiprocessing.get_context("spawn")) as pool:
            return first + [h for part in pool.map(one_each, _batches(rest)) for h in part]
    except BrokenProcessPool:  # a main module that cannot be re-imported (python - < script): read them here
        return first + one_each(rest)


def _batches(paths: list[str]) -> list[list[str]]:
    return [paths[i : i + HEADERS_PER_TASK] for i in range(0, len(paths), HEADERS_PER_TASK)]


def _run_batches(work, batches, cfg, spec, rt, strict, replaced_of, lock) -> tuple[list[int], list[tuple[str, str]]]:
    """Compute the batches, ``cluster.batches_in_flight`` at a time, committing as they go.

    Before a batch starts, the driver writes its per-tile metadata (it follows from the plan);
    its graph then reads, fingerprints (staging each unit's rows) and writes
    ``fingerprint``/``valid``, one task per Zarr chunk. An image is committed (``done``) once
    every Zarr chunk holding it is written: within ``store.commit_seconds`` of that, and at the
    latest when its batch ends, whose staged units are then deleted. A batch that fails on one
    unreadable file is retried without it (that image is recorded ``failed``) unless ``strict``;
    any other error stops new batches, lets those in flight finish and be committed, then is
    raised.
    """
    done: list[int] = []
    failures: list[tuple[str, str]] = []
    z = cfg.store.chunk_tiles
    progress = Progress(
        sum(len(b.plans) for b in batches), sum(b.windows for b in batches), enabled=cfg.cluster.progress
    )
    chunks_of: dict[int, list[int]] = {}  # batch -> the Zarr chunk of each of its parts
    written: dict[int, set[int]] = {}  # batch -> its Zarr chunks written so far
    committed: set[int] = set()
    last_commit = time.monotonic()

    def build(batch: plan.Batch) -> list:
        for run in batch.runs:
            store.write_tile_meta(work, run[0].tile_start, plan.tile_meta(run))
        parts = graph.batch_parts(work, batch, cfg, spec, staging.staged(work))
        chunks_of[id(batch)], written[id(batch)] = [part.key[1] for part in parts], set()
        return parts

    def complete(p: plan.ImagePlan, have: set[int]) -> bool:
        return all(c in have for c in range(p.tile_start // z, (p.tile_stop - 1) // z + 1))

    def commit(ids: list[int]) -> None:
        nonlocal last_commit
        _commit(work, ids, [], replaced_of)
        committed.update(ids)
        done.extend(ids)
        progress.advance(images=len(ids))
        lock.refresh()
        last_commit = time.monotonic()

    todo: deque[plan.Batch] = deque(batches)
    fatal: BaseException | None = None
    for event in rt.stream(todo, build, in_flight=cfg.cluster.batches_in_flight):
        batch = event.item
        if event.part is not None:
            have = written[id(batch)]
            have.add(chunks_of[id(batch)][event.part])
            progress.advance(tiles=event.result)
            if time.monotonic() - last_commit >= cfg.store.commit_seconds:
                ready = [p.image_id for p in batch.plans if p.image_id not in committed and complete(p, have)]
                if ready:
                    commit(ready)
            continue
        if event.error is None:
            commit([p.image_id for p in batch.plans if p.image_id not in committed])
            staging.drop_staged(work, batch.plans[0].tile_start, batch.plans[-1].tile_stop)
            faults.after_commit()
            continue
        culprit = _culprit(event.error, batch)
        if culprit is not None and not strict and fatal is None:
            why = str(event.error)
            _commit(work, [], [(culprit.image_id, why)], replaced_of)
            failures.append((culprit.info.path, why))
            progress.advance(images=1)
            rest = batch.without(culprit.image_id)
            if rest is not None:
                todo.append(rest)
            continue
        if fatal is None:
            fatal = event.error
            todo.clear()  # start nothing new; batches in flight finish and are committed
    progress.close()
    if fatal is not None:
        raise fatal
    staging.clear_staging(work)
    return done, failures


def _culprit(error: BaseException, batch: plan.Batch) -> plan.ImagePlan | None:
    """The image of ``batch`` an unreadable-pixels error names, if it names one."""
    if not isinstance(error, RasterError):
        return None
    return next((p for p in batch.plans if str(error).startswith(p.info.path + ":")), None)


def _redate(work: Path | str, table: dict[str, np.ndarray], acquired: dict[str, np.datetime64],
            items: dict[str, str]) -> int:  # fmt: skip
    """Images already in the store get the acquisition times (and STAC ids) this run's explicit
    sources give them, where those are known and differ: dating an archive after its ingest
    needs no re-ingest. Returns how many changed."""
    have = np.asarray(table["acquired"], dtype="datetime64[s]") if "acquired" in table else None
    ids, when, item = [], [], []
    for i, (path, status) in enumerate(zip(table["image_path"], table["status"])):
        t = acquired.get(str(path))
        if status in ("replaced", "removed") or t is None or np.isnat(t):
            continue
        if have is not None and have[i] == t and (not items or table["item_id"][i] == items.get(str(path), "")):
            continue
        ids.append(i)
        when.append(t)
        item.append(items.get(str(path), table["item_id"][i] if "item_id" in table else ""))
    if ids:
        store.write_rows(work, np.array(ids), {"acquired": np.array(when, dtype="datetime64[s]"),
                                               "item_id": np.array(item, dtype=object)})  # fmt: skip
        log.info("acquired: %d image(s) already in the store dated", len(ids))
    return len(ids)


def _commit(work: Path | str, done_ids: list[int], failed: list[tuple[int, str]], replaced_of: dict[int, int]) -> None:
    """Make finished images visible (and their older versions invisible), one status write each."""
    store.set_status(work, done_ids, "done")
    store.set_status(work, sorted(replaced_of[i] for i in done_ids if i in replaced_of), "replaced")
    for image_id, why in failed:
        store.set_status(work, [image_id], "failed", [why])
