"""Argument types and flag groups shared by several commands."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3, got {text!r}") from None


def float_list(n: int) -> Callable[[str], tuple[float, ...]]:
    def parse(text: str) -> tuple[float, ...]:
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            vals = ()
        if len(vals) != n:
            raise argparse.ArgumentTypeError(f"expected {n} comma-separated numbers, got {text!r}")
        return vals

    return parse


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML settings file (default: built-in defaults = configs/default.yaml)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")


def add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", dest="model.arch", help="backbone (default resnet18)")
    g.add_argument(
        "--weights",
        dest="model.weights",
        help="imagenet (torchvision cache/download), random (tests only) or a state_dict file path",
    )
    g.add_argument("--device", dest="model.device", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch-size", dest="model.batch_size", type=int, help="windows per forward pass")
    g.add_argument("--amp", dest="model.amp", choices=["none", "bf16", "fp16"], help="autocast on CUDA")
    g.add_argument("--torch-threads", dest="model.torch_threads", type=int, help="0 = cores / dask threads")


def add_cluster(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scheduler")
    g.add_argument(
        "--scheduler",
        dest="cluster.scheduler",
        help="threads (default) | sync | local | local-cuda | kubernetes | slurm | pbs | tcp://host:8786",
    )
    g.add_argument("--workers", dest="cluster.n_workers", type=int, help="local: worker processes")
    g.add_argument("--threads", dest="cluster.threads", type=int, help="dask threads (per worker for local)")
    g.add_argument("--no-progress", dest="cluster.progress", action="store_false", default=None)
