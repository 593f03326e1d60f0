"""Device blocks: the search space of a persisted index as torch tensors on a device (a CUDA GPU,
or the CPU, where CI runs the very same code), and the per-block map of a search through the
scorer seam: scores, masks and the top-k selection on the device; only each block's few best
rows per query (their uids, centres and exact scores) come back to the host. The merge and
finalize that follow are the CPU engine's (:mod:`pipeline.search.topk`).

A :class:`DeviceBlock` holds, for the ``n`` tiles of one block: ``x`` the search space ``(n, d)``
in the store's dtype (or the ``--index-dtype`` asked for), ``sqnorm`` float32 (+inf where not
valid), ``valid``, ``uid`` (int64: uids stay below 2**63; image, row and column are unpacked
from it on the device when a filter or an exclusion needs them) and ``lon``/``lat`` float64;
codes as packed integers: binary codes as int32 words ``(n, B / 4)``, PQ codes as uint8 columns
``(m, n)``. :func:`bytes_per_tile` is what memory planning counts.

**Scores.** Every scorer of :mod:`pipeline.search.scorers` has its device form (:func:`scores`),
computed as the CPU engine computes it: the norm expansion with float32 accumulation for
distances (a float16 block on CUDA multiplies float16 rows by the query split into two float16
halves, ``q = hi + lo``, accumulating in float32: float32 accuracy at float16 bandwidth; on the
CPU the rows are widened to float32 a slice at a time, exactly), the same formulas for example
sets and classifiers, popcounts for Hamming distances (:mod:`pipeline.search.popcount`), table
look-ups summed in the CPU's order for PQ codes. Row slices bound the ``(rows, queries)`` score
matrix (:data:`SCORE_BUDGET`): 100 queries over 1e8 tiles never hold 37 GiB of scores.

**Filters and exclusion on the device.** Validity, statuses, bbox, image ids and overlap
exclusion apply as masks (+inf) before the selection, on the device: the answer needs no
over-fetch and stays exact.

**Exact answers.** Distances from the expansion carry float32 rounding, so a selection by them
alone can swap two tiles whose scores differ in the last bits. Each column keeps every row
within ``2 * margin`` of its k-th smallest device score (``margin`` bounds the rounding, as the
threshold collection of :mod:`pipeline.search.kernels` uses it); those rows go to the host,
where the CPU engine's own ``scorer.exact`` scores them and :func:`pipeline.search.topk.select`
keeps the ``k`` best by ``(score, uid)``. Reported values and their order are the NumPy engine's.
Hamming and PQ scores are exact on the device (integers; float32 sums in the host's order): the
selection there is by ``(score, uid)`` on the device, so at 1e9 binary codes the thousands of
tiles tied at the k-th distance are decided by the lowest uids, as the CPU engine decides them.

torch is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import grid
from pipeline.errors import SearchError
from pipeline.geo import local_metres
from pipeline.search import kernels, scorers
from pipeline.search.kernels import Exclusions, Filters
from pipeline.search.scorers import Block, Scorer
from pipeline.search.topk import RESULT_DTYPE, select

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16")
SCORE_BUDGET = 1 << 27  # float32 scores held at once per block (512 MiB): rows per slice = this / queries
CAST_ROWS = 1 << 15  # float16 rows widened at once where the device has no mixed-precision product (CPU)
META_BYTES = 8 + 8 + 8 + 1  # uid int64, lon and lat float64, valid bool


@dataclass
class DeviceBlock:
    """One block of a persisted index on ``device`` (see the module docstring)."""

    device: str
    uid: Any
    lon: Any
    lat: Any
    valid: Any
    all_valid: bool
    x: Any = None
    sqnorm: Any = None
    words: Any = None  # binary codes: int32 (n, B / 4)
    code_cols: Any = None  # PQ codes: uint8 (m, n)
    code_bytes: int = 0

    def __len__(self) -> int:
        return int(self.uid.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes this block holds on its device."""
        tensors = (self.uid, self.lon, self.lat, self.valid, self.x, self.sqnorm, self.words, self.code_cols)
        return int(sum(t.element_size() * t.nelement() for t in tensors if t is not None))

    def location(self) -> tuple[Any, Any, Any]:
        """``(image, row, col)`` int64 tensors, unpacked from the uids (:func:`pipeline.grid.unpack_uid`)."""
        u = self.uid
        return (u >> grid.IMAGE_SHIFT, ((u >> grid.ROW_SHIFT) & grid.MAX_GRID_INDEX) * grid.STRIDE,
                (u & grid.MAX_GRID_INDEX) * grid.STRIDE)  # fmt: skip

    def host_rows(self, rows: np.ndarray) -> Block:
        """A host block of the given rows: what the CPU engine's exact scores and re-rank read."""
        import torch

        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)

        def get(t: Any, dim: int = 0) -> np.ndarray:
            return t.index_select(dim, idx).cpu().numpy()

        out: Block = {"uid": get(self.uid).view(np.uint64), "lon": get(self.lon), "lat": get(self.lat),
                      "valid": np.ones(len(rows), bool)}  # fmt: skip
        if self.x is not None:
            out["fingerprint"] = get(self.x)
        if self.words is not None:
            out["codes"] = np.ascontiguousarray(get(self.words)).view(np.uint8)[:, : self.code_bytes]
        elif self.code_cols is not None:
            out["codes"] = np.ascontiguousarray(get(self.code_cols, 1).T)
        return out


def bytes_per_tile(dims: int, dtype: str | None, code_bytes: int = 0, pq: bool = False) -> int:
    """Device bytes one tile of a :class:`DeviceBlock` takes: the search space (``dims`` in
    ``dtype``, none when None), its float32 norm, the codes (binary padded to whole int32 words),
    and the per-tile metadata (:data:`META_BYTES`)."""
    space = dims * np.dtype(dtype).itemsize + 4 if dtype else 0
    codes = code_bytes if pq else -(-code_bytes // 4) * 4
    return space + codes + META_BYTES


def free_bytes(device: str) -> int:
    """Memory free for an index on ``device``: the GPU's free memory, or the host's available memory."""
    import os

    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def check_fits(n: int, per_tile: int, device: str, what: str, reserve: float = 0.1) -> None:
    """Refuse, naming the numbers, to fill ``device`` with ``n`` tiles of ``per_tile`` bytes when
    they (plus ``reserve`` of the free memory, for scores and selections) do not fit."""
    free = free_bytes(device)
    usable = int(free * (1 - reserve))
    if n * per_tile > usable:
        raise SearchError(
            f"{what}: {n:,} tiles x {per_tile} B = {n * per_tile / 2**30:.2f} GiB on {device}, but {free / 2**30:.2f} GiB "
            f"is free there ({usable / 2**30:.2f} GiB after a {reserve:.0%} reserve for scores): {usable // per_tile:,} tiles "
            f"fit. Use --index-dtype float16, --codes (a persisted index then holds codes beside the rows), more "
            f"devices (a cluster of GPU workers), or search from the store without --index-device"
        )


def resolve(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is refused."""
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise SearchError(f"--index-device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SearchError(f"--index-device {device} asked for, but torch sees no CUDA GPU here; use --index-device cpu")
    return device


def to_device(block: Block, device: str = "auto", dtype: str | None = None) -> DeviceBlock:
    """A persisted host block (:func:`pipeline.search.kernels.make_block` with norms) on
    ``device`` (resolved where this runs: a cluster's GPU worker puts it on its own GPU);
    ``dtype`` (float32 | float16) converts the search space, else it keeps the block's own."""
    import torch

    device = resolve(device)

    def put(a: np.ndarray, dt: Any = None) -> Any:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)

    valid = np.asarray(block["valid"], bool)
    out = DeviceBlock(device=device, uid=put(np.asarray(block["uid"], np.uint64).view(np.int64)),
                      lon=put(np.asarray(block["lon"], np.float64)), lat=put(np.asarray(block["lat"], np.float64)),
                      valid=put(valid), all_valid=bool(valid.all()))  # fmt: skip
    if "fingerprint" in block:
        held = kernels.as_dtype(block, dtype) if dtype else block
        out.x = put(held["fingerprint"])
        sq = held.get("sqnorm")
        out.sqnorm = put(scorers.masked_sqnorm(held["fingerprint"], valid) if sq is None else sq, torch.float32)
    if "code_words" in block:  # 64-bit words, word-major (the CPU scan's layout): back to rows
        from pipeline import codes as codes_mod

        b = codes_mod.rows_of_words(block["code_words"], np.arange(len(valid)))
        out.code_bytes = b.shape[1]
        out.words = put(_int32_words(b))
    elif "code_cols" in block:
        out.code_cols = put(block["code_cols"])
        out.code_bytes = int(block["code_cols"].shape[0])
    elif "codes" in block:
        out.code_bytes = int(block["codes"].shape[1])
        out.words = put(_int32_words(np.asarray(block["codes"])))
    return out


def assemble(parts: Iterable[Block], n: int, device: str = "auto", dtype: str | None = None) -> DeviceBlock:
    """One device block of ``n`` rows filled in order from host blocks (each put there by
    :func:`to_device`'s rules): the host holds one part at a time and the device no second copy
    of the block, so an index of a GPU's size loads from store chunks of a few MB."""
    import torch

    out: DeviceBlock | None = None
    a = 0
    for part in parts:
        d = to_device(part, device, dtype)
        if out is None:
            def alloc(t: Any, cols: bool = False) -> Any:
                if t is None:
                    return None
                shape = (t.shape[0], n) if cols else (n, *t.shape[1:])
                return torch.empty(shape, dtype=t.dtype, device=t.device)

            out = DeviceBlock(d.device, alloc(d.uid), alloc(d.lon), alloc(d.lat), alloc(d.valid), True, alloc(d.x),
                              alloc(d.sqnorm), alloc(d.words), alloc(d.code_cols, True), d.code_bytes)  # fmt: skip
        b = a + len(d)
        if b > n:
            raise SearchError(f"device block of {n} rows given {b} rows")
        for name in ("uid", "lon", "lat", "valid", "x", "sqnorm", "words"):
            if getattr(out, name) is not None:
                getattr(out, name)[a:b] = getattr(d, name)
        if out.code_cols is not None:
            out.code_cols[:, a:b] = d.code_cols
        out.all_valid &= d.all_valid
        a = b
    if out is None or a != n:
        raise SearchError(f"device block of {n} rows filled with {a}")
    return out


def _int32_words(codes: np.ndarray) -> np.ndarray:
    """uint8 codes ``(n, B)`` as int32 words ``(n, ceil(B / 4))``, zero-padded (zeros XOR zeros)."""
    pad = -codes.shape[1] % 4
    if pad:
        codes = np.concatenate([codes, np.zeros((len(codes), pad), np.uint8)], axis=1)
    return np.ascontiguousarray(codes).view(np.int32)


# --------------------------------------------------------------------------------------------
# What goes up once per call: a scorer's tensors on a device, shared by the blocks there


_UPLOADED: OrderedDict = OrderedDict()
_LOCK = threading.Lock()


def _uploaded(scorer: Scorer, device: str) -> dict[str, Any]:
    """The scorer's queries (example sets, classifiers, codes, tables) on ``device``, uploaded
    once and shared by every block of the call there (keyed by the scorer object)."""
    key = (id(scorer), device)
    with _LOCK:
        hit = _UPLOADED.get(key)
        if hit is not None and hit[0] is scorer:
            return hit[1]
    t = _upload(scorer, device)
    with _LOCK:
        _UPLOADED[key] = (scorer, t)
        while len(_UPLOADED) > 8:
            _UPLOADED.popitem(last=False)
    return t


def _upload(scorer: Scorer, device: str) -> dict[str, Any]:
    import torch

    def f32(a: np.ndarray) -> Any:
        return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=device)

    if isinstance(scorer, scorers.L2Scorer):  # CentroidScorer included
        q = f32(scorer.queries)
        return {"q": q, "qq": torch.as_tensor(np.einsum("ij,ij->i", scorer.queries, scorer.queries), device=device)}
    if isinstance(scorer, scorers.LinearScorer):
        return {"q": -f32(scorer.coef), "b": -f32(np.asarray(scorer.intercept, np.float32))}
    if isinstance(scorer, scorers.NearestScorer):
        sets = []
        for c in range(len(scorer)):
            p = scorer.positives[c]
            n = scorer.negatives[c] if len(scorer.negatives[c]) and scorer.weights[c] else None
            sets.append((f32(p), f32(np.einsum("ij,ij->i", p, p)),
                         None if n is None else f32(n), None if n is None else f32(np.einsum("ij,ij->i", n, n))))  # fmt: skip
        return {"sets": sets}
    if isinstance(scorer, scorers.HammingScorer):
        return {"codes": torch.as_tensor(_int32_words(np.asarray(scorer.codes, np.uint8)), device=device)}
    if isinstance(scorer, scorers.PQScorer):
        return {"tables": f32(scorer.tables)}
    raise SearchError(f"{type(scorer).__name__} has no device form; search this index without --index-device")


# --------------------------------------------------------------------------------------------
# Scores on the device: (m, rows) float32, one row per query, lower is better


def _dots(q: Any, x: Any) -> Any:
    """``q @ x.T`` float32 ``(m, rows)`` for float32 ``q`` and rows ``x`` (float32 or float16),
    with float32 sums."""
    import torch

    if x.dtype == torch.float32:
        return q @ x.T
    if x.is_cuda and mixed_precision(str(x.device)):
        hi = q.half()
        lo = (q - hi.float()).half()
        d = torch.mm(torch.cat([hi, lo]), x.T, out_dtype=torch.float32)
        return d[: len(q)] + d[len(q) :]
    return torch.cat([q @ x[a : a + CAST_ROWS].float().T for a in range(0, len(x), CAST_ROWS)], dim=1)


_MIXED: dict[str, bool] = {}


def mixed_precision(device: str) -> bool:
    """Whether ``torch.mm(..., out_dtype=torch.float32)`` multiplies float16 matrices with float32
    sums on ``device`` (CUDA, torch >= 2.8); without it float16 rows are widened a slice at a time."""
    import torch

    if device not in _MIXED:
        try:
            a = torch.ones((2, 8), dtype=torch.float16, device=device)
            _MIXED[device] = bool(torch.mm(a, a.T, out_dtype=torch.float32).dtype == torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            _MIXED[device] = False
    return _MIXED[device]


def _sq_dists(e: Any, ee: Any, x: Any, sq: Any) -> Any:
    d2 = _dots(e, x)
    d2 *= -2.0
    d2 += sq[None, :]
    d2 += ee[:, None]
    return d2


def slice_scores(block: DeviceBlock, scorer: Scorer, a: int, b: int) -> Any:
    """The scorer's float32 scores of rows ``a:b`` of the block, ``(m, b - a)``, on its device."""
    import torch

    from pipeline.search import popcount

    t = _uploaded(scorer, block.device)
    if isinstance(scorer, scorers.HammingScorer):
        return popcount.hamming(block.words[a:b], t["codes"]).float()
    if isinstance(scorer, scorers.PQScorer):
        tables, cols = t["tables"], block.code_cols[:, a:b].long()
        out = torch.empty((len(tables), b - a), dtype=torch.float32, device=block.device)
        for j in range(len(tables)):
            acc = tables[j, 0][cols[0]]
            for s in range(1, cols.shape[0]):
                acc += tables[j, s][cols[s]]  # the host's order of float32 sums: the same values
            out[j] = acc
        return out
    x, sq = block.x[a:b], block.sqnorm[a:b]
    if isinstance(scorer, scorers.L2Scorer):
        return _sq_dists(t["q"], t["qq"], x, sq)
    if isinstance(scorer, scorers.LinearScorer):
        s = _dots(t["q"], x)
        s += t["b"][:, None]
        return s
    finite = torch.where(torch.isfinite(sq), sq, torch.zeros_like(sq))
    rows = []
    for c, (p, pp, n, nn) in enumerate(t["sets"]):
        s = _sq_dists(p, pp, x, finite).amin(0).clamp_(min=0.0).sqrt_()
        if n is not None:
            s -= scorer.weights[c] * _sq_dists(n, nn, x, finite).amin(0).clamp_(min=0.0).sqrt_()
        rows.append(s)
    out = torch.stack(rows)
    out[:, ~torch.isfinite(sq)] = float("inf")
    return out


def exact_on_device(scorer: Scorer) -> bool:
    """Whether the device scores equal ``scorer.exact`` (integer Hamming distances; PQ sums in
    the host's order): the selection needs no exact pass on the host."""
    return isinstance(scorer, (scorers.HammingScorer, scorers.PQScorer))


def margin(scorer: Scorer, value: Any) -> Any:
    """A bound on ``|device score - exact score|`` near ``value`` (0 where the device is exact):
    the threshold collection's margin (:func:`pipeline.search.kernels.chunk_threshold`)."""
    if exact_on_device(scorer):
        return 0.0 * value
    return 1e-3 + 1e-4 * abs(value)


# --------------------------------------------------------------------------------------------
# Masks on the device


def mask(s: Any, block: DeviceBlock, a: int, filters: Filters, exclude: Exclusions, half_m: np.ndarray,
         usable: np.ndarray | None) -> None:  # fmt: skip
    """Set the scores ``s`` (m, rows) of rows ``a:a + rows`` to +inf, in place, where a tile may
    not answer a query: :func:`pipeline.search.kernels.mask_scores` on the device (overlap of the
    same image by pixels, of other images by ground footprints, :func:`pipeline.geo.local_metres`)."""
    import torch

    b = a + s.shape[1]
    need_loc = (usable is not None and not usable.all()) or filters.image_ids is not None
    need_loc = need_loc or (not filters.include_overlapping and len(exclude) > 0)
    if need_loc:
        image, row, col = (v[a:b] for v in block.location())
    lon, lat = block.lon[a:b], block.lat[a:b]
    ok = None if block.all_valid else block.valid[a:b].clone()

    def both(m: Any) -> Any:
        return m if ok is None else ok & m

    if usable is not None and not usable.all():
        ok = both(torch.as_tensor(usable, device=block.device)[image])
    if filters.bbox is not None:
        w, so, e, n = filters.bbox
        ok = both((lon >= w) & (lon <= e) & (lat >= so) & (lat <= n))
    if filters.image_ids is not None:
        ok = both(torch.isin(image, torch.as_tensor(np.asarray(filters.image_ids, np.int64), device=block.device)))
    if ok is not None:
        s[:, ~ok] = float("inf")
    if filters.include_overlapping or not len(exclude):
        return
    half = torch.as_tensor(np.asarray(half_m, np.float64), device=block.device)
    half_rows = half[image] if len(half) else torch.full_like(lon, float("nan"))
    for e in range(len(exclude)):
        im = int(exclude.image[e])
        hit = (image == im) & ((row - int(exclude.row[e])).abs() < grid.TILE) & ((col - int(exclude.col[e])).abs() < grid.TILE)
        lon_b, lat_b, half_b = float(exclude.lon[e]), float(exclude.lat[e]), float(exclude.half_m[e])
        if np.isfinite(lon_b) and np.isfinite(lat_b) and np.isfinite(half_b):
            dx, dy = local_metres(lon, lat, lon_b, lat_b)
            reach = half_rows + half_b
            hit |= (image != im) & (dx.abs() < reach) & (dy.abs() < reach)
        s[int(exclude.column[e]), hit] = float("inf")


# --------------------------------------------------------------------------------------------
# The per-block map: top-k and threshold, equal to the CPU engine's


def _slices(block: DeviceBlock, m: int) -> range:
    return range(0, len(block), max(1024, SCORE_BUDGET // max(m, 1)))


def _masked(block: DeviceBlock, scorer: Scorer, a: int, filters: Filters, exclude: Exclusions,
            half_m: np.ndarray, usable: np.ndarray | None) -> Any:  # fmt: skip
    b = min(len(block), a + max(1024, SCORE_BUDGET // max(len(scorer), 1)))
    s = slice_scores(block, scorer, a, b)
    mask(s, block, a, filters, exclude, half_m, usable)
    return s


def _cut(s: Any, k: int, scorer: Scorer) -> Any:
    """Per query (row of ``s``): ``2 * margin`` above its k-th smallest score (float32's largest
    value when it has fewer than k finite scores: every finite one)."""
    import torch

    kth = torch.topk(s, min(k, s.shape[1]), dim=1, largest=False, sorted=False).values.amax(1)
    big = torch.full_like(kth, torch.finfo(torch.float32).max)
    return torch.where(torch.isfinite(kth), kth + 2 * margin(scorer, kth), big)


def _per_query(hit: Any, s: Any, a: int) -> list[tuple[Any, Any]]:
    """(rows + a, scores) of the True entries of ``hit`` (m, rows), split by query (nonzero's
    row-major order groups them so)."""
    import torch

    q, r = torch.nonzero(hit, as_tuple=True)
    counts = torch.bincount(q, minlength=hit.shape[0]).tolist()
    return list(zip((r + a).split(counts), s[q, r].split(counts)))


def _trim(rows: Any, vals: Any, k: int, scorer: Scorer) -> tuple[Any, Any]:
    """The union of the slices' candidates of one query cut to the global ``2 * margin`` band."""
    if len(rows) <= k:
        return rows, vals
    keep = vals <= _cut(vals[None, :], k, scorer)[0]
    return rows[keep], vals[keep]


def _candidates(block: DeviceBlock, scorer: Scorer, k: int, filters: Filters, exclude: Exclusions,
                half_m: np.ndarray, usable: np.ndarray | None) -> list[tuple[Any, Any]]:  # fmt: skip
    """Per query: (rows, device scores) holding its k best, over the row slices."""
    import torch

    parts: list[list] = [[] for _ in range(len(scorer))]
    for a in _slices(block, len(scorer)):
        s = _masked(block, scorer, a, filters, exclude, half_m, usable)
        for j, got in enumerate(_per_query(s <= _cut(s, k, scorer)[:, None], s, a)):
            parts[j].append(got)
    return [_trim(torch.cat([p[0] for p in ps]), torch.cat([p[1] for p in ps]), k, scorer) for ps in parts]


def _results(block: DeviceBlock, scorer: Scorer, rows: np.ndarray, j: int, values: np.ndarray | None) -> np.ndarray:
    """RESULT_DTYPE of ``rows`` for query ``j``: ``values`` where the device is exact, else the
    CPU engine's exact scores of those rows."""
    host = block.host_rows(rows)
    res = np.empty(len(rows), dtype=RESULT_DTYPE)
    if values is not None:
        res["score"] = values
    else:
        res["score"] = scorer.exact(host, np.arange(len(rows)), j) if len(rows) else np.zeros(0)
    res["uid"], res["lon"], res["lat"] = host["uid"], host["lon"], host["lat"]
    return res


def _by_score_uid(rows: Any, vals: Any, uid: Any, k: int) -> tuple[Any, Any]:
    """The ``k`` smallest ``(score, uid)`` pairs, on the device."""
    import torch

    order = torch.sort(uid[rows], stable=True).indices
    rows, vals = rows[order], vals[order]
    order = torch.sort(vals, stable=True).indices[:k]
    return rows[order], vals[order]


def chunk_topk(block: DeviceBlock, scorer: Scorer, k: int, filters: Filters, exclude: Exclusions,
               half_m: np.ndarray, usable: np.ndarray | None = None) -> list[np.ndarray]:  # fmt: skip
    """:func:`pipeline.search.kernels.chunk_topk` of a device block: per query, the unsorted
    partial top-k as RESULT_DTYPE."""
    out = []
    for j, (rows, vals) in enumerate(_candidates(block, scorer, k, filters, exclude, half_m, usable)):
        if exact_on_device(scorer):
            rows, vals = _by_score_uid(rows, vals, block.uid, k)
            out.append(_results(block, scorer, rows.cpu().numpy(), j, vals.double().cpu().numpy()))
        else:
            res = _results(block, scorer, rows.cpu().numpy(), j, None)
            out.append(res[select(res["score"], res["uid"], k)])
    return out


def chunk_threshold(block: DeviceBlock, scorer: Scorer, max_score: float, limit: int, filters: Filters,
                    exclude: Exclusions, half_m: np.ndarray, usable: np.ndarray | None = None
                    ) -> tuple[list[np.ndarray], np.ndarray]:  # fmt: skip
    """:func:`pipeline.search.kernels.chunk_threshold` of a device block. Rows further than the
    margin below the threshold pass for sure and are counted on the device; rows within the
    margin of it (the band) and the best ``limit`` candidates go to the host for exact scores."""
    import torch

    m, tol = len(scorer), float(margin(scorer, max_score))
    counts = np.zeros(m, dtype=np.int64)
    parts: list[list] = [[] for _ in range(m)]
    for a in _slices(block, m):
        s = _masked(block, scorer, a, filters, exclude, half_m, usable)
        counts += (s <= max_score - tol).sum(1).cpu().numpy()
        s[s > max_score + tol] = float("inf")
        hit = s <= _cut(s, limit, scorer)[:, None]
        if tol:  # the band: counted after their exact scores, so always among the candidates
            hit |= (s > max_score - tol) & torch.isfinite(s)
        for j, got in enumerate(_per_query(hit, s, a)):
            parts[j].append(got)
    out = []
    for j in range(m):
        rows = torch.cat([p[0] for p in parts[j]])
        vals = torch.cat([p[1] for p in parts[j]])
        band = vals > max_score - tol
        if len(rows) > limit:
            keep = (vals <= _cut(vals[None, :], limit, scorer)[0]) | band
            rows, vals, band = rows[keep], vals[keep], band[keep]
        if exact_on_device(scorer):
            res = _results(block, scorer, rows.cpu().numpy(), j, vals.double().cpu().numpy())
        else:
            res = _results(block, scorer, rows.cpu().numpy(), j, None)
            counts[j] += int((res["score"][band.cpu().numpy()] <= max_score).sum())
        res = res[res["score"] <= max_score]
        if len(res) > limit:
            res = res[select(res["score"], res["uid"], limit)]
        out.append(res)
    return out, counts


def rerank_block(block: DeviceBlock, rows: np.ndarray, member: np.ndarray, scorer: Scorer, k: int) -> list[np.ndarray]:
    """:func:`pipeline.search.kernels.rerank_block` of a device block: the candidates' float rows
    are gathered on the device, and their exact scores are the host scorer's (a few hundred rows)."""
    return kernels.rerank_block(block.host_rows(rows), np.arange(len(rows)), member, scorer, k)
