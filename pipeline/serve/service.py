"""What the HTTP API does, without HTTP: :class:`Service` holds one in-memory index and answers
the requests of :mod:`pipeline.serve.app` with plain Python values (JSON documents, PNG bytes).

Every value a request carries is parsed here and refused with a :class:`RequestError` (status
and one line) when it does not fit: uids are 64-bit integers, places are ``LON,LAT``, boxes
``W,S,E,N``, images are store image ids. No request value is ever opened as a file: tiles and
previews are read from the store's own image paths, looked up by uid or image id; ``images``
is a glob matched against those paths.

Searches run one at a time on one thread (:class:`Batcher`): each already uses every core (the
index holds one block per dask thread), and the single queries (uid, place, upload) that
arrive while one runs, with the same settings, are answered together in the next pass over
the index, as ``search --uid A --uid B`` answers both in one pass.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline import grid
from pipeline.dates import DateRange, iso
from pipeline.errors import AerialSearchError, SearchError
from pipeline.search import Filters, Queries, SearchIndex
from pipeline.search.results import Result
from pipeline.serve.basemap import Basemap, encode_png, footprint_ring

log = logging.getLogger(__name__)

MAX_QUERIES = 64  # uid / place queries per request
MAX_EXAMPLES = 500  # positives + negatives per example set
MAX_K = 10_000
UID_RE = re.compile(r"^[0-9]{1,20}$")


class RequestError(AerialSearchError, ValueError):
    """A request the service cannot answer: ``status`` (4xx) and a one-line message."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- parsing of request values --------------------------------------------------------------


def parse_uid(text: Any, what: str = "uid") -> int:
    s = str(text).strip()
    if not UID_RE.match(s) or int(s) >= 1 << 64:
        raise RequestError(f"{what} {s[:40]!r} is not a tile uid (a 64-bit unsigned integer, as search returns it)")
    return int(s)


def parse_numbers(text: Any, n: int, what: str, example: str) -> tuple[float, ...]:
    if isinstance(text, (list, tuple)):
        vals = text
    else:
        vals = str(text).split(",")
    try:
        out = tuple(float(v) for v in vals)
    except (TypeError, ValueError):
        out = ()
    if len(out) != n or not all(math.isfinite(v) for v in out):
        raise RequestError(f"{what} {str(text)[:60]!r} is not {n} comma-separated numbers like {example}")
    return out


def parse_lonlat(text: Any) -> tuple[float, float]:
    lon, lat = parse_numbers(text, 2, "lonlat", "-82.03,29.82")
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise RequestError(f"lonlat {lon},{lat} is not a place on Earth (lon -180..180, lat -90..90)")
    return lon, lat


def parse_bbox(text: Any) -> tuple[float, float, float, float]:
    w, s, e, n = parse_numbers(text, 4, "bbox", "-82.1,29.7,-81.9,29.9 (W,S,E,N)")
    if not (w < e and s < n):
        raise RequestError(f"bbox {w},{s},{e},{n} is empty: give W,S,E,N with W < E and S < N")
    return w, s, e, n


def check_range(value: int | None, what: str, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise RequestError(f"{what} {value} is out of range {lo}..{hi}")


@dataclass(frozen=True)
class Settings:
    """What a search returns: ``k`` best or everything past ``threshold`` (the best ``limit``),
    within ``filters``; ``diverse`` spatial suppression. Hashable: single queries with equal
    settings are answered in one pass."""

    k: int | None = 10
    threshold: float | None = None
    limit: int = 10_000
    filters: Filters = field(default_factory=Filters)
    diverse: bool = False
    date_note: dict | None = None  # date: the range and how many images it kept / left out, in each query

    def noted(self, results: list[Result]) -> list[Result]:
        for res in results:
            if self.date_note is not None:
                res.query["date"] = self.date_note
        return results


# ---- one search at a time, single queries batched ---------------------------------------------


@dataclass
class _Job:
    future: Future
    run: Callable[[], Any] | None = None  # a whole search of its own
    key: Any = None  # or single queries: settings key, queries, labels, runner
    queries: Queries | None = None
    labels: list[dict] = field(default_factory=list)
    runner: Callable[[Queries, list[dict]], list[Result]] | None = None


class Batcher:
    """A search thread: jobs run one at a time, and single-query jobs waiting with the same
    settings key are concatenated into one search (at most ``max_queries`` queries)."""

    def __init__(self, max_queries: int = 256):
        self.max_queries = max_queries
        self._cv = threading.Condition()
        self._queue: list[_Job] = []
        self._closed = False
        self.passes = 0  # searches run (for tests and benchmarks: batching at work)
        self._thread = threading.Thread(target=self._loop, name="aerial-search-search", daemon=True)
        self._thread.start()

    def call(self, run: Callable[[], Any]) -> Any:
        return self._submit(_Job(Future(), run=run))

    def search(self, key: Any, queries: Queries, labels: list[dict], runner) -> list[Result]:
        return self._submit(_Job(Future(), key=key, queries=queries, labels=labels, runner=runner))

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _submit(self, job: _Job) -> Any:
        with self._cv:
            if self._closed:
                raise RequestError("the server is shutting down", 503)
            self._queue.append(job)
            self._cv.notify()
        return job.future.result()

    def _take(self) -> list[_Job] | None:
        with self._cv:
            while not self._queue and not self._closed:
                self._cv.wait()
            if not self._queue:
                return None
            first = self._queue.pop(0)
            if first.run is not None:
                return [first]
            batch, rest, n = [first], [], len(first.queries)
            for job in self._queue:
                if job.run is None and job.key == first.key and n + len(job.queries) <= self.max_queries:
                    batch.append(job)
                    n += len(job.queries)
                else:
                    rest.append(job)
            self._queue = rest
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.passes += 1
            if batch[0].run is not None:
                _settle(batch[0].future, batch[0].run)
                continue
            if len(batch) == 1:
                job = batch[0]
                _settle(job.future, lambda job=job: job.runner(job.queries, job.labels))
                continue
            try:
                results = batch[0].runner(
                    Queries.concat([j.queries for j in batch]), [lab for j in batch for lab in j.labels]
                )
            except BaseException:  # answer each alone, so that each gets its own result or error
                for job in batch:
                    _settle(job.future, lambda job=job: job.runner(job.queries, job.labels))
                continue
            start = 0
            for job in batch:
                job.future.set_result(results[start : start + len(job.queries)])
                start += len(job.queries)


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as e:
        future.set_exception(e)


# ---- the service -------------------------------------------------------------------------------


class Service:
    """One store's index held in memory, its image footprints and basemap, and the answers.

    ``weights``/``device``: for uploaded query images, a local copy of the store's weights file
    and where to run the model. ``max_upload``: bytes an uploaded image may have.
    """

    def __init__(self, index: SearchIndex, weights: str | None = None, device: str = "auto",
                 max_upload: int = 20 << 20):  # fmt: skip
        self.index = index
        self.weights = weights
        self.device = device
        self.max_upload = max_upload
        self.batcher = Batcher()
        self.follows = {"grown": 0, "reloaded": 0, "errors": 0, "last_error": ""}
        self._follower: threading.Thread | None = None
        self._stop = threading.Event()
        self._adopt(index)

    def _adopt(self, index: SearchIndex) -> None:
        """Serve ``index``: its footprints, tile counts and basemap, then the index itself."""
        ds = index.ds
        pre = index.provenance.get("preprocessing", {})
        self.bands = tuple(pre.get("bands", (1, 2, 3)))
        self.scale = pre.get("scale")
        geom = index.geometry
        table = index.image_table
        rings = [
            footprint_ring(geom["transform"][i], str(geom["crs"][i]), int(table["width"][i]), int(table["height"][i]))
            for i in range(ds.sizes["img"])
        ]
        image = ds["image"].values
        valid = ds["valid"].values & (image >= 0)
        self.tiles_per_image = np.bincount(image[valid], minlength=ds.sizes["img"])
        self.basemap = Basemap(index.image_paths, rings, self.bands, self.scale, index.acquired)
        self.rings = rings
        self.index = index
        self.loaded_at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def basemap_tile(self, z: int, x: int, y: int, date: str | None = None) -> bytes:
        """XYZ tile ``z/x/y`` of the archive, the latest flight on top; ``date`` (FROM/TO): only
        the images acquired in that range (undated images are in none; none at all: transparent)."""
        if not date:
            return self.basemap.tile(z, x, y)
        with _as_request_errors():
            rng = DateRange.parse(str(date), "date")
        keep = rng.mask(self.index.acquired)
        return self.basemap.tile(z, x, y, keep, key=(str(rng.start), str(rng.stop)))

    # ---- following the store ------------------------------------------------------------------

    def refresh(self) -> str:
        """Bring the index up to the store's current snapshot (:meth:`SearchIndex.follow`): new
        images done are added as new blocks and statuses re-read (removals drop out at once);
        a compacted, migrated or re-post-processed store is loaded anew. The new index is built
        beside the served one and swapped in between two searches (on the search thread), so no
        search sees a half-updated index. Returns ``same``, ``grown`` or ``reloaded``."""
        new, how = self.index.follow()
        if how != "same":
            self.batcher.call(lambda: self._adopt(new))
            self.follows[how] += 1
            log.info("store %s %s: now snapshot %s", self.index.path, how, new.snapshot())
        return how

    def follow(self, seconds: float) -> None:
        """Check the store for changes every ``seconds`` on a background thread (``serve``)."""
        if seconds <= 0 or self._follower is not None:
            return

        def loop() -> None:
            while not self._stop.wait(seconds):
                try:
                    self.refresh()
                except Exception as e:  # noqa: BLE001 (a store mid-write, storage hiccup: keep serving, retry)
                    self.follows["errors"] += 1
                    self.follows["last_error"] = str(e)[:300]
                    log.warning("following the store failed (serving the previous snapshot): %s", e)

        self._follower = threading.Thread(target=loop, name="aerial-search-follow", daemon=True)
        self._follower.start()

    @classmethod
    def open(cls, store: str, runtime: Any = None, index_device: str = "", index_dtype: str = "", **kwargs: Any) -> Service:
        """Open ``store`` and hold its index in (cluster) memory, or on ``index_device``
        (:meth:`SearchIndex.persist`) in ``index_dtype``: waiting queries then go up as one batch."""
        index = SearchIndex.open(store, runtime)
        return cls(index.persist(device=index_device or None, dtype=index_dtype or None), **kwargs)

    def close(self) -> None:
        self._stop.set()
        self.batcher.close()

    # ---- searches ------------------------------------------------------------------------

    def settings(self, k: int | None, threshold: float | None, limit: int, bbox: Any, images: str | None,
                 include_overlapping: bool, diverse: bool, threshold_name: str = "max_distance",
                 date: str | None = None) -> Settings:  # fmt: skip
        if k is not None and threshold is not None:
            raise RequestError(f"k and {threshold_name} both given: choose one")
        k = 10 if k is None and threshold is None else k
        check_range(k, "k", 1, MAX_K)
        check_range(limit, "limit", 1, 100_000)
        if threshold is not None and not math.isfinite(threshold):
            raise RequestError(f"{threshold_name} must be a finite number")
        image_ids = None
        if images:
            try:
                image_ids = self.index.image_ids_matching(str(images))
            except SearchError as e:
                raise RequestError(str(e).replace("--images", "images")) from None
        note = None
        if date:
            with _as_request_errors():
                image_ids, note = self.index.image_ids_acquired(DateRange.parse(str(date), "date"), image_ids)
        filters = Filters(bool(include_overlapping), parse_bbox(bbox) if bbox else None, image_ids)
        return Settings(k, threshold, int(limit), filters, bool(diverse), note)

    def _single_runner(self, s: Settings) -> Callable[[Queries, list[dict]], list[Result]]:
        def run(queries: Queries, labels: list[dict]) -> list[Result]:
            return s.noted(self.index.search(queries, s.k, s.filters, diverse=s.diverse, labels=labels,
                                             max_distance=s.threshold, limit=s.limit))  # fmt: skip

        return run

    def search(self, uids: Sequence[Any], lonlats: Sequence[Any], s: Settings) -> list[Result]:
        """Results for tile uids and places (``GET /api/search``), in that order: places first,
        as ``aerial-search search`` orders them."""
        if not uids and not lonlats:
            raise RequestError("no query: give uid=UID or lonlat=LON,LAT (or POST examples)")
        if len(uids) + len(lonlats) > MAX_QUERIES:
            raise RequestError(f"{len(uids) + len(lonlats)} queries in one request; at most {MAX_QUERIES}")
        parsed_uids = [parse_uid(u) for u in uids]
        points = [parse_lonlat(p) for p in lonlats]
        parts, labels = [], []
        with _as_request_errors():
            if points:
                q, lab = self.index.queries_from_lonlats(points)
                parts.append(q)
                labels += lab
            if parsed_uids:
                q, lab = self.index.queries_from_uids(parsed_uids)
                parts.append(q)
                labels += lab
            return self.batcher.search(s, Queries.concat(parts), labels, self._single_runner(s))

    def search_examples(self, positives: Sequence[Any], negatives: Sequence[Any], s: Settings,
                        score: str = "centroid", negative_weight: float | None = None,
                        classifier: bool = False, background: int = 200, seed: int = 0) -> list[Result]:  # fmt: skip
        """One example set (``POST /api/search``): ranked by its score, or by a classifier fitted
        on it (``classifier``; ``background`` random tiles as extra negatives)."""
        from pipeline.examples import answer, example_set, parse_ref

        if len(positives) + len(negatives) > MAX_EXAMPLES:
            raise RequestError(f"{len(positives) + len(negatives)} examples; at most {MAX_EXAMPLES} per search")
        check_range(background, "background", 0, 100_000)
        with _as_request_errors():
            pos = [parse_ref(_ref_text(r), files=False) for r in positives]
            neg = [parse_ref(_ref_text(r), files=False) for r in negatives]
            es, query = example_set(self.index, pos, neg, score, negative_weight)

            def run() -> list[Result]:
                model = None
                if classifier:
                    from pipeline.classify import fit

                    model = fit(self.index, es, background, seed)
                q = model.query_of(query) if model is not None else query
                return s.noted(answer(self.index, es, q, s.k, s.threshold, s.limit, s.filters, s.diverse, model))

            return self.batcher.call(run)

    def changes(self, before: str, after: str, bbox: Any = None, k: int | None = None,
                min_distance: float | None = None, limit: int = 10_000, score: str = "distance") -> list[Result]:  # fmt: skip
        """``aerial-search changes`` (``GET /api/changes``): after windows against the same ground
        before, the most changed first (:mod:`pipeline.changes`)."""
        from pipeline.changes import changes

        if not before or not after:
            raise RequestError("changes needs before=FROM/TO and after=FROM/TO (ISO dates, either end may be open)")
        if k is not None and min_distance is not None:
            raise RequestError("k and min_distance both given: choose one")
        k = 100 if k is None and min_distance is None else k
        check_range(k, "k", 1, MAX_K)
        check_range(limit, "limit", 1, 100_000)
        box = parse_bbox(bbox) if bbox else None
        with _as_request_errors():
            rb, ra = DateRange.parse(str(before), "before"), DateRange.parse(str(after), "after")

            def run() -> list[Result]:
                import warnings

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # no pairs, no CRS: the document says what was paired
                    return [changes(self.index, rb, ra, box, k, min_distance, limit, score)[0]]

            return self.batcher.call(run)

    def history(self, lonlat: Any = None, uid: Any = None, date: str | None = None) -> list[Result]:
        """``aerial-search history`` (``GET /api/history``): the window over a place (``lonlat``,
        or the centre of tile ``uid``) in every image covering it, oldest first."""
        from pipeline.history import history, place_of

        if (lonlat is None) == (uid is None):
            raise RequestError("history needs one place: lonlat=LON,LAT or uid=UID")
        point = parse_lonlat(lonlat) if lonlat is not None else None
        with _as_request_errors():
            rng = DateRange.parse(str(date), "date") if date else None

            def run() -> list[Result]:
                lon, lat = point if point is not None else place_of(self.index, uid)
                return [history(self.index, lon, lat, rng)]

            return self.batcher.call(run)

    def search_image(self, data: bytes, name: str, s: Settings) -> list[Result]:
        """An uploaded image as the query (``POST /api/search/image``), fingerprinted with the
        store's model after the query-image size rule."""
        from pipeline.query import decode_image, fingerprint_pixels

        if len(data) > self.max_upload:
            raise RequestError(f"upload of {len(data):,} bytes is over the {self.max_upload:,}-byte limit", 413)
        if not data:
            raise RequestError("empty upload: send the image bytes (multipart field 'file', or the request body)")
        label = re.sub(r"[^\w.\- ]", "_", name or "upload")[:80]
        with _as_request_errors():
            pixels = decode_image(data, f"uploaded image {label!r}", self.bands, self.scale)
            fp = fingerprint_pixels(pixels[None], self.index.provenance, self.weights, self.device)
            labels = [{"type": "image", "image": label, "label": f"uploaded {label}"}]
            return self.batcher.search(s, Queries.from_fingerprints(fp), labels, self._single_runner(s))

    # ---- documents ----------------------------------------------------------------------------

    def document(self, results: list[Result], footprints: bool = False) -> Any:
        """``search --json``'s shape: one query's document, or a list of them. ``footprints``:
        each document also carries a GeoJSON FeatureCollection of its query's and results'
        windows (EPSG:4326; windows of images without a CRS have none)."""
        docs = []
        for res in results:
            doc = res.to_json()
            if footprints:
                doc["footprints"] = self.footprints(res)
            docs.append(doc)
        return docs[0] if len(docs) == 1 else docs

    def footprints(self, res: Result) -> dict[str, Any]:
        from pipeline.export import window_ring, window_rings

        feats = []
        q = res.query
        if q.get("uid") and q.get("type") in ("uid", "lonlat"):
            image_id = int(grid.unpack_uid(np.uint64(int(q["uid"])))[0])
            geom = self.index.geometry
            ring = window_ring(geom["transform"][image_id], str(geom["crs"][image_id]), q["row"], q["col"])
            if ring is not None:
                feats.append(_feature(ring, {"role": "query", "uid": q["uid"]}))
        for rec, ring in zip(res.records(), window_rings(res)):
            if ring is not None:
                feats.append(_feature(ring, {"role": "result", "rank": rec["rank"], "uid": rec["uid"],
                                             res.value_name: rec[res.value_name],
                                             **({"before_uid": rec["before_uid"]} if "before_uid" in rec else {})}))  # fmt: skip
        return {"type": "FeatureCollection", "features": feats}

    def export(self, results: list[Result]) -> dict[str, Any]:
        """The hits as window polygons: ``search --geojson``'s FeatureCollection."""
        import warnings

        from pipeline.export import to_geojson

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hits without a CRS are left out; the JSON results list them
            return to_geojson(results)

    def info(self) -> dict[str, Any]:
        from pipeline.summary import summarize

        doc = summarize(self.index.path)
        doc["server"] = {
            "index_in_memory": self.index.in_memory,
            "images_on_map": sum(r is not None for r in self.rings),
            "images_without_crs": sum(r is None for r in self.rings),
            "max_upload_bytes": self.max_upload,
            "value_names": {"uid": "distance", "examples": "score", "classifier": "probability"},
            "snapshot": {"id": self.index.snapshot(), "loaded": self.loaded_at, "images": int(len(self.rings)),
                         "tiles": int(self.tiles_per_image.sum()), **{k: v for k, v in self.follows.items()}},
        }
        return doc

    def images(self) -> dict[str, Any]:
        """The images as a GeoJSON FeatureCollection of footprints (geometry null without a CRS)."""
        ds = self.index.ds
        status = self.index.statuses if "status" in ds else ["done"] * ds.sizes["img"]
        table, geom = self.index.image_table, self.index.geometry
        feats = []
        for i, path in enumerate(self.index.image_paths):
            props = {
                "id": i, "name": str(path).rsplit("/", 1)[-1], "path": str(path), "status": str(status[i]),
                "width": int(table["width"][i]), "height": int(table["height"][i]),
                "tiles": int(self.tiles_per_image[i]), "crs": str(geom["crs"][i]) or None,
                "acquired": iso(geom["acquired"][i]),
            }  # fmt: skip
            ring = self.rings[i]
            feats.append(_feature(ring, props) if ring else {"type": "Feature", "properties": props, "geometry": None})
        return {"type": "FeatureCollection", "features": feats}

    # ---- pixels -------------------------------------------------------------------------------

    def tile_png(self, uid_text: str, size: int | None = None) -> bytes:
        """The pixels of a tile's 256 x 256 window (a windowed read of its source image)."""
        from pipeline.render import read_tile

        uid = parse_uid(uid_text)
        check_range(size, "size", 16, 256)
        try:
            self.index.slot_of(uid)
        except SearchError as e:
            raise RequestError(str(e), 404) from None
        image_id, row, col = (int(v) for v in grid.unpack_uid(np.uint64(uid)))
        path = str(self.index.image_paths[image_id])
        try:
            rgb = read_tile(path, row, col, self.bands, self.scale)
        except Exception as e:
            raise RequestError(f"the pixels of uid {uid} cannot be read from {path} ({type(e).__name__}); "
                               "if the imagery moved, `aerial-search relocate` the store", 404) from None  # fmt: skip
        return encode_png(rgb, size)

    def image_id(self, text: Any) -> int:
        n = self.index.ds.sizes["img"]
        s = str(text)
        if not s.isascii() or not s.isdigit() or not int(s) < n:
            raise RequestError(f"image {s[:40]!r} is not an image id of the store (0..{n - 1})", 404)
        return int(s)

    def preview_png(self, image: Any, max_size: int = 1024) -> tuple[bytes, float]:
        from pipeline.serve.basemap import preview

        i = self.image_id(image)
        check_range(max_size, "max", 64, 4096)
        path = str(self.index.image_paths[i])
        try:
            return preview(path, self.bands, self.scale, max_size)
        except Exception as e:
            raise RequestError(f"{path} cannot be read ({type(e).__name__})", 404) from None

    def uid_at_pixel(self, image: Any, x: float, y: float) -> dict[str, Any]:
        """The searchable window of an image whose centre is nearest pixel ``(x, y)``."""
        i = self.image_id(image)
        table = self.index.image_table
        h, w = int(table["height"][i]), int(table["width"][i])
        nr, nc = grid.windows_per_axis(h), grid.windows_per_axis(w)
        if not (nr and nc):
            raise RequestError(f"image {i} is smaller than a window and has no tiles", 404)
        r = min(max(round((y - grid.TILE / 2) / grid.STRIDE), 0), nr - 1) * grid.STRIDE
        c = min(max(round((x - grid.TILE / 2) / grid.STRIDE), 0), nc - 1) * grid.STRIDE
        uid = int(grid.pack_uid(i, r, c))
        with _as_request_errors(404):
            self.index.queries_from_uids([uid])  # refuses dropped windows and images not done
        return {"uid": str(uid), "image": i, "row": r, "col": c}


def _ref_text(ref: Any) -> str:
    """An example as JSON gives it: a uid (string or integer), ``"lonlat:LON,LAT"`` or ``[lon, lat]``."""
    if isinstance(ref, (list, tuple)):
        lon, lat = parse_lonlat(ref)
        return f"lonlat:{lon},{lat}"
    return str(ref)


def _feature(ring: list, props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "Feature", "properties": props,
            "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}}  # fmt: skip


class _as_request_errors:
    """User errors of the search (unknown uid, no tile at a place, ...) as 4xx request errors."""

    def __init__(self, status: int = 400):
        self.status = status

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, AerialSearchError) and not isinstance(exc, RequestError):
            raise RequestError(str(exc), self.status) from None
        return False
