"""One module per ``aerial-search`` subcommand, each with the same two functions:

- ``add_parser(sub)``: add the subcommand (named after the module) and its flags to the CLI's
  subparsers;
- ``main(args, cfg) -> int``: run it with the parsed arguments and the settings
  (:class:`~pipeline.config.Config`, from ``--config`` and the flags), returning the exit status.

:data:`COMMANDS` lists them in the order ``aerial-search --help`` shows. A new command is a new
module here plus its place in that tuple; :mod:`pipeline.cli` wires every one the same way.
Heavy imports (torch, dask) happen inside ``main`` so that ``--help`` stays instant.
"""

from pipeline.commands import (
    changes,
    classify,
    compact,
    demo,
    evaluate,
    heatmap,
    history,
    info,
    ingest,
    migrate,
    postprocess,
    relocate,
    remove,
    search,
    serve,
    weights,
)

COMMANDS = (
    ingest, search, classify, heatmap, changes, history, serve, info, postprocess, remove, relocate, compact, migrate, evaluate, demo, weights,
)  # fmt: skip


def name_of(command) -> str:
    """The subcommand name of a command module (its module name)."""
    return command.__name__.rsplit(".", 1)[-1]
