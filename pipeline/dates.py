"""Acquisition times: parsing, the four sources an ingest takes them from, and date ranges.

An image's ``acquired`` (image table, ``datetime64[s]``, UTC, NaT when unknown) comes from the
first of these that knows it:

1. the STAC item the image came from (its ``datetime``, else ``start_datetime``);
2. ``ingest --dates FILE``: a CSV with a header ``path,acquired``, one image per line (a path
   relative to the CSV's folder, an absolute path or URI, or a bare file name);
3. ``ingest --date-pattern REGEX``: named groups over the file name (else the whole path, for
   flights kept in dated folders): ``date`` (``20191109``, ``2019-11-09``, any ISO 8601 date or
   time), or ``year`` with ``month``, ``day`` and optionally ``hour``, ``minute``, ``second``. NAIP's ``m_3008601_ne_16_060_20191109.tif``:
   ``_(?P<date>\\d{8})\\.tif$``;
4. the file's own time (:func:`pipeline.raster.capture_time`): EXIF ``DateTimeOriginal``, the
   camera's capture time (drone frames), else the TIFF ``DateTime`` tag (``YYYY:MM:DD
   HH:MM:SS``, read as UTC).

A value that the CSV or the pattern gives but that is no date is an error naming the file and the
value (the ingest then stops before it touches the store): those are the user's statements. The
file's tag is often junk (a scanner's clock, a blank), so an unparseable tag is a warning and NaT.

A :class:`DateRange` (``--date FROM/TO``) keeps images acquired from FROM to TO, both ends
inclusive (a date-only TO includes its whole day), either end open; images without a date fail
every range.
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import re
import warnings
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, RasterError

NAT = np.datetime64("NaT", "s")
_DAY = np.timedelta64(1, "D")


class DateError(RasterError):
    """A date a user gave (CSV, pattern, --date) that cannot be read."""


def parse_when(text: str) -> np.datetime64:
    """An ISO 8601 date or date-time (``2019-11-09``, ``20191109``, ``2019-11-09T10:30:00Z``,
    ``...+02:00``, ``2019:11:09 10:30:00`` as TIFF writes it) as ``datetime64[s]`` UTC.
    A time without an offset is taken as UTC. Raises ValueError otherwise."""
    s = str(text).strip()
    if not s:
        raise ValueError("empty")
    m = re.fullmatch(r"(\d{4}):(\d{2}):(\d{2})([ T].*)?", s)  # TIFF / EXIF
    if m:
        s = f"{m[1]}-{m[2]}-{m[3]}{(m[4] or '').replace(' ', 'T', 1)}"
    if re.fullmatch(r"\d{8}", s):
        s = f"{s[:4]}-{s[4:6]}-{s[6:]}"
    if s.endswith(("Z", "z")):
        s = s[:-1] + "+00:00"
    t = dt.datetime.fromisoformat(s)
    if t.tzinfo is not None:
        t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return np.datetime64(t.replace(microsecond=0), "s")


def iso(value: np.datetime64 | None) -> str | None:
    """``2019-11-09T10:30:00Z`` (None for NaT): how outputs write an acquisition time."""
    if value is None or np.isnat(value):
        return None
    return f"{np.datetime_as_string(np.datetime64(value, 's'), unit='s')}Z"


# --------------------------------------------------------------------------------------------
# Date ranges (--date FROM/TO)


@dataclass(frozen=True)
class DateRange:
    """``[start, stop)`` in ``datetime64[s]``; an open end is NaT. ``text``: as the user wrote it."""

    start: np.datetime64 = NAT
    stop: np.datetime64 = NAT
    text: str = ""

    @classmethod
    def parse(cls, text: str, flag: str = "--date") -> DateRange:
        """``FROM/TO`` (ISO dates or times, both ends inclusive; ``FROM/``, ``/TO`` or ``..`` for
        an open end) or a single date (that day, or year ``2019`` / month ``2019-11``)."""
        s = str(text).strip()
        if "/" not in s:
            return cls._period(s, flag)
        lo, hi = (p.strip() for p in s.split("/", 1))
        start = cls._end(lo, flag, s, upper=False)
        stop = cls._end(hi, flag, s, upper=True)
        if not np.isnat(start) and not np.isnat(stop) and stop <= start:
            raise ConfigError(f"{flag} {s}: the range ends before it starts; write FROM/TO with FROM first")
        return cls(start, stop, s)

    @classmethod
    def _period(cls, s: str, flag: str) -> DateRange:
        if re.fullmatch(r"\d{4}", s):
            y = int(s)
            return cls(np.datetime64(f"{y:04d}-01-01T00:00:00", "s"), np.datetime64(f"{y + 1:04d}-01-01T00:00:00", "s"), s)
        if re.fullmatch(r"\d{4}-\d{2}", s):
            start = _month(s, flag, s)
            return cls(np.datetime64(start, "s"), np.datetime64(start + 1, "s"), s)
        start = cls._end(s, flag, s, upper=False)
        if np.isnat(start):
            raise ConfigError(f"{flag} needs FROM/TO (ISO dates, either end may be left open), got {s!r}")
        return cls(start, start + np.timedelta64(1, "D") if _date_only(s) else start + np.timedelta64(1, "s"), s)

    @staticmethod
    def _end(part: str, flag: str, whole: str, upper: bool) -> np.datetime64:
        if part in ("", "..", "*"):
            return NAT
        if re.fullmatch(r"\d{4}", part):  # a year: its first day, or (upper) its whole
            return np.datetime64(f"{int(part) + upper:04d}-01-01T00:00:00", "s")
        if re.fullmatch(r"\d{4}-\d{2}", part):
            m = _month(part, flag, whole)
            return np.datetime64(m + 1 if upper else m, "s")
        try:
            t = parse_when(part)
        except ValueError:
            raise ConfigError(
                f"{flag} {whole}: {part!r} is not an ISO date (write FROM/TO like 2019-01-01/2020-12-31; either end "
                f"may be left open: 2019-01-01/)"
            ) from None
        if upper:  # inclusive: a date-only end includes its whole day, a time its whole second
            t = t + (_DAY if _date_only(part) else np.timedelta64(1, "s"))
        return t

    def mask(self, acquired: np.ndarray) -> np.ndarray:
        """bool per value: inside the range (NaT never is)."""
        a = np.asarray(acquired, dtype="datetime64[s]")
        ok = ~np.isnat(a)
        if not np.isnat(self.start):
            ok &= a >= self.start
        if not np.isnat(self.stop):
            ok &= a < self.stop
        return ok

    def describe(self) -> dict[str, str | None]:
        """``{"from", "to"}`` as given back in JSON (``to`` inclusive, as the user wrote it)."""
        return {"from": iso(self.start), "to": iso(self.stop - np.timedelta64(1, "s")) if not np.isnat(self.stop) else None}


def _month(part: str, flag: str, whole: str) -> np.datetime64:
    if not 1 <= int(part[5:]) <= 12:
        raise ConfigError(f"{flag} {whole}: {part!r} is not a month (YYYY-MM, 01 to 12)")
    return np.datetime64(part, "M")


def _date_only(s: str) -> bool:
    return bool(re.fullmatch(r"\d{4}-?\d{2}-?\d{2}", s.strip()))


def left_out(acquired: np.ndarray, usable: np.ndarray, rng: DateRange) -> dict[str, int]:
    """How a range splits the usable images: ``kept``, ``outside`` (dated, out of range) and
    ``undated`` (NaT: they fail every range)."""
    a = np.asarray(acquired, dtype="datetime64[s]")[usable]
    inside = rng.mask(a)
    undated = np.isnat(a)
    return {"kept": int(inside.sum()), "outside": int((~inside & ~undated).sum()), "undated": int(undated.sum())}


# --------------------------------------------------------------------------------------------
# Sources of acquisition times at ingest


@dataclass
class DateSources:
    """What an ingest knows about acquisition times beyond the files: STAC items' times
    (``stac``: path -> time), a CSV (``csv_path``) and a file-name pattern (``pattern``)."""

    stac: dict[str, np.datetime64] = field(default_factory=dict)
    csv_path: str = ""
    pattern: str = ""
    items: dict[str, str] = field(default_factory=dict)  # path -> the STAC item's id

    def explicit(self) -> bool:
        """Whether any source beyond the TIFF tag was given (it then also dates images already
        in the store)."""
        return bool(self.stac or self.csv_path or self.pattern)

    def resolve(self, paths: Sequence[str], tags: Sequence[str], fresh: Collection[str] | None = None) -> np.ndarray:
        """``datetime64[s]`` per path: STAC, CSV, pattern, then the TIFF ``DateTime`` tag
        (``tags``, ``""`` without one). Raises :class:`DateError` for a CSV or pattern value
        that is no date; warns (once, with a count) about tags that are not, and about the
        images of ``fresh`` (default: all) that the CSV has no line for (with the CSV's lines
        that name no image: a misspelt name is the usual cause)."""
        out = np.full(len(paths), NAT)
        table = read_csv(self.csv_path) if self.csv_path else {}
        regex = compile_pattern(self.pattern) if self.pattern else None
        junk: list[tuple[str, str]] = []
        unmatched: list[str] = []
        uncovered: list[str] = []
        used: set[str] = set()
        for i, (path, tag) in enumerate(zip(paths, tags)):
            if path in self.stac:
                out[i] = self.stac[path]
                continue
            if table:
                hit = _csv_lookup(table, path)
                if hit is not None:
                    out[i], line = hit
                    used.add(line)
                    continue
                if fresh is None or path in fresh:
                    uncovered.append(path)
            if regex is not None:
                t = from_pattern(regex, path)
                if t is not None:
                    out[i] = t
                    continue
                unmatched.append(path)
            if tag:
                try:
                    out[i] = parse_when(tag)
                except ValueError:
                    junk.append((path, tag))
        if junk:
            path, tag = junk[0]
            more = f" (and {len(junk) - 1} more file(s))" if len(junk) > 1 else ""
            warnings.warn(f"{path}: its DateTime tag {tag!r} is not a date; acquired left unknown (NaT){more}",
                          stacklevel=3)  # fmt: skip
        if uncovered:
            stray = sorted({line for _, line in table.values()} - used)
            then = "--date-pattern, then the file's DateTime tag" if regex is not None else "file's DateTime tag"
            hint = (f"; {len(stray)} line(s) of it name no image of this ingest (e.g. {stray[0]}): check the "
                    f"spelling" if stray else "")  # fmt: skip
            of = len(paths) if fresh is None else sum(p in fresh for p in paths)
            warnings.warn(f"--dates {self.csv_path} has no line for {len(uncovered)} of {of} new image(s) (e.g. "
                          f"{os.path.basename(uncovered[0])}); those take the {then}, if any{hint}", stacklevel=3)  # fmt: skip
        if unmatched and regex is not None:
            warnings.warn(f"--date-pattern {self.pattern!r} finds no date in {len(unmatched)} of {len(paths)} file "
                          f"name(s) or path(s) (e.g. {os.path.basename(unmatched[0])}); those take the file's DateTime tag, if any",
                          stacklevel=3)  # fmt: skip
        return out


def read_csv(path: str) -> dict[str, tuple[np.datetime64, str]]:
    """``path -> (time, the path as the line wrote it)`` from a CSV with columns ``path`` and
    ``acquired`` (keys: the path as written, resolved against the CSV's folder, and the bare
    file name)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DateError(f"--dates {path} does not exist: pass a CSV with a header line path,acquired")
    out: dict[str, tuple[np.datetime64, str]] = {}
    with p.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "acquired"} <= {n.strip() for n in reader.fieldnames}:
            raise DateError(f"--dates {p}: the CSV needs a header line path,acquired (it has {reader.fieldnames})")
        for n, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k}
            if not row.get("path"):
                continue
            try:
                t = parse_when(row["acquired"])
            except ValueError:
                raise DateError(
                    f"--dates {p}, line {n}: {row['acquired']!r} for {row['path']} is not a date; write ISO 8601 "
                    f"(2019-11-09 or 2019-11-09T10:30:00Z) and rerun: the store was not changed"
                ) from None
            name = row["path"]
            out[name] = (t, name)
            if "://" not in name:
                out[str((p.parent / name).expanduser().resolve())] = (t, name)
            out.setdefault("\0" + name.rsplit("/", 1)[-1], (t, name))
    return out


def _csv_lookup(table: dict[str, tuple[np.datetime64, str]], path: str) -> tuple[np.datetime64, str] | None:
    if path in table:
        return table[path]
    return table.get("\0" + path.rsplit("/", 1)[-1])


def compile_pattern(pattern: str) -> re.Pattern[str]:
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"--date-pattern {pattern!r} is not a regular expression ({e})") from None
    groups = set(regex.groupindex)
    if "date" not in groups and not {"year", "month", "day"} <= groups:
        raise ConfigError(
            f"--date-pattern {pattern!r} needs a named group (?P<date>...) or (?P<year>...), (?P<month>...) and "
            f"(?P<day>...); NAIP's file names: '_(?P<date>\\d{{8}})\\.tif$'"
        )
    return regex


def from_pattern(regex: re.Pattern[str], path: str) -> np.datetime64 | None:
    """The time ``regex`` finds in the file name of ``path``, else in the whole path (flights
    kept in dated folders); None when it matches neither."""
    name = path.rsplit("/", 1)[-1]
    m = regex.search(name) or regex.search(path.replace(os.sep, "/"))
    if m is None:
        return None
    g = {k: v for k, v in m.groupdict().items() if v is not None}
    value = g.get("date") or "-".join(g.get(k, "") for k in ("year", "month", "day"))
    try:
        if "date" in g:
            return parse_when(g["date"])
        t = dt.datetime(int(g["year"]), int(g["month"]), int(g["day"]), int(g.get("hour", 0)),
                        int(g.get("minute", 0)), int(g.get("second", 0)))  # fmt: skip
        return np.datetime64(t, "s")
    except (ValueError, KeyError):
        raise DateError(
            f"{path}: --date-pattern found {value!r}, which is not a date; fix the pattern or the file name and "
            f"rerun: the store was not changed"
        ) from None


def year_counts(acquired: Iterable[np.datetime64]) -> dict[str, int]:
    """Images per year (``"unknown"`` for NaT), in year order."""
    a = np.asarray(list(acquired), dtype="datetime64[s]")
    years = a[~np.isnat(a)].astype("datetime64[Y]").astype(int) + 1970
    out = {str(y): int(n) for y, n in zip(*np.unique(years, return_counts=True))}
    if np.isnat(a).any():
        out["unknown"] = int(np.isnat(a).sum())
    return out
