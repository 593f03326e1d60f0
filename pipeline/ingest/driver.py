"""The ingest driver: plans the sources against the store, computes one batch of images at a
time on the runtime, and commits each batch's statuses after its chunks are written.

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

import datetime as dt
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import faults, raster, store
from pipeline.cluster import runtime
from pipeline.config import Config
from pipeline.embed import ModelSpec, describe_weights
from pipeline.errors import RasterError, StoreError
from pipeline.ingest import plan
from pipeline.ingest.graph import write_graph
from pipeline.lock import StoreLock


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
) -> IngestReport:
    """Fingerprint every window of ``sources`` into the store at ``store_path`` (see the module
    docstring for what happens to existing stores, failures and crashes).

    ``client``: an existing ``distributed.Client`` (otherwise ``config.cluster`` decides).
    """
    cfg = config or Config()
    final = store.check_writable(store_path)
    try:
        return _ingest(sources, final, cfg, overwrite, strict, client, batch_tiles)
    except OSError as e:  # disk full, read-only or vanished storage: say so, and that work is kept
        raise StoreError(
            f"writing store {final} failed: {e.strerror or e} ({e.filename or ''}); free space or fix permissions "
            f"on that storage, then rerun the same command: finished images are kept and it resumes"
        ) from e


def _ingest(
    sources, final, cfg: Config, overwrite: bool, strict: bool, client: Any, batch_tiles: int | None
) -> IngestReport:
    remote = store.is_remote(final)
    with StoreLock(final) as lock:
        paths = raster.expand_sources(sources)
        if not paths:
            raise RasterError(
                f"no images found in {list(map(str, sources))}: pass GeoTIFF files, folders of them or a .txt list"
            )
        weights = describe_weights(cfg.model.arch, cfg.model.weights, cfg.model.seed)
        if not weights["pretrained"]:
            warnings.warn(f"ingesting with {weights['weights_id']}", stacklevel=3)
        existing = store.exists(final) and not overwrite
        work = final if (existing or remote) else store.partial_path(final)
        if overwrite:
            if remote:
                store.discard(final)
            elif store.exists(work):
                store.discard(work)
        t0 = time.perf_counter()
        with runtime(cfg.cluster, client=client) as rt:
            threads = cfg.model.torch_threads or rt.torch_threads  # an explicit setting wins
            spec = ModelSpec.from_config(cfg.model, weights["weights_sha256"], torch_threads=threads)
            attrs = store.schema_attrs(cfg, spec.arch, spec.dim, weights)
            have_store = store.exists(work)
            if have_store:
                if not store.is_store(work):
                    raise StoreError(f"{work} exists and is not a fingerprint store; choose another --store path")
                diff = store.signature_diff(store.read_attrs(work), attrs)
                if diff:
                    raise StoreError(
                        f"store {final} holds fingerprints made differently ({diff}); fingerprints of different "
                        f"models, weights or preprocessing never mix in one store: use another --store"
                    )
                table = store.read_table(work)
            else:
                table = store.empty_table()
            found = plan.classify(paths, table, cfg, strict)
            failures = list(found.failures)
            if failures and not (found.new or found.redo or found.skipped):
                raise RasterError("no source could be used:\n" + "\n".join(why for _, why in failures))
            if not have_store:
                store.create_store(work, attrs, spec.dim, cfg.store.dtype, cfg.store.chunk_tiles, cfg.store.compressor)
            n_images, n_slots = len(table["image_path"]), int(table["n_tiles"])
            plans, batches, n_tiles = plan.allocate(
                found.new, n_images, n_slots, cfg.store.chunk_tiles, cfg.read.chunk_px,
                batch_tiles or cfg.store.batch_tiles or 8 * cfg.store.chunk_tiles,
            )  # fmt: skip
            if plans:
                store.grow(work, max(n_tiles, n_slots), n_images + len(plans))
                store.write_rows(work, np.array([p.image_id for p in plans]), plan.table_rows(plans, found.hashes))
            for _path, why in failures:  # files that could not even be opened: reported, not in the table
                warnings.warn(f"skipped {why}", stacklevel=3)
            old_plans = [
                plan.plan_images([info], cfg.read.chunk_px, i, int(table["tile_start"][i]))[0] for i, info in found.redo
            ]
            work_batches = [plan.runs(b) for b in batches] + [[run] for run in plan.runs(old_plans)]
            replaced_of = {plans[k].image_id: old for k, old in found.replaces.items()}
            done: list[int] = []
            for runs in work_batches:
                for run in runs:
                    done_ids, bad = _write_with_retry(work, run, cfg, spec, rt, strict)
                    done += done_ids
                    failures += [(p.info.path, why) for p, why in bad]
                    _commit(work, done_ids, [(p.image_id, why) for p, why in bad], replaced_of)
                    lock.refresh()
                    faults.after_commit()
            store.set_attrs(
                work,
                last_ingest={
                    "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "failed": [{"path": p, "reason": why} for p, why in failures],
                },
            )
            scheduler = rt.describe()
        if work != final:
            store.swap_in(work, final)
    seconds = time.perf_counter() - t0
    ran = {p.image_id for p in plans} | {i for i, _ in found.redo}
    all_plans = {p.image_id: p for p in [*plans, *old_plans]}
    valid = store.read_valid(final)
    slots = np.concatenate([np.arange(p.tile_start, p.tile_start + p.tile_count) for i, p in all_plans.items() if i in done]
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
    )


def _write_with_retry(work, run, cfg, spec, rt, strict):
    """Write a run of images; an image whose pixels cannot be read is dropped from the run
    (reported as failed) and the rest rewritten, unless ``strict``."""
    try:
        rt.compute(write_graph(work, run, cfg, spec))
        return [p.image_id for p in run], []
    except RasterError as e:
        culprit = next((p for p in run if str(e).startswith(p.info.path + ":")), None)
        if strict or culprit is None:
            raise
        done, bad = [], [(culprit, str(e))]
        for sub in plan.runs([p for p in run if p is not culprit]):
            d, b = _write_with_retry(work, sub, cfg, spec, rt, strict)
            done += d
            bad += b
        return done, bad


def _commit(work: Path | str, done_ids: list[int], failed: list[tuple[int, str]], replaced_of: dict[int, int]) -> None:
    """Make finished images visible (and their older versions invisible), one status write each."""
    store.set_status(work, done_ids, "done")
    store.set_status(work, sorted(replaced_of[i] for i in done_ids if i in replaced_of), "replaced")
    for image_id, why in failed:
        store.set_status(work, [image_id], "failed", [why])
