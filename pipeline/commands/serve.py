"""``aerial-search serve --store S [--host 127.0.0.1] [--port 8000] [--token TOKEN]``: hold the
store's index in memory and serve the map page and the HTTP API (:mod:`pipeline.serve`)."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import time

from pipeline.commands.common import add_cluster, add_common, add_index, index_device
from pipeline.config import Config
from pipeline.errors import ConfigError

TOKEN_ENV = "AERIAL_SEARCH_TOKEN"


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="search the store from a map page in the browser, and over an HTTP API")
    p.add_argument("--store", required=True, help="the Zarr store to serve")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; any other needs --token)")  # fmt: skip
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--token", help=f"require this token (API: 'Authorization: Bearer TOKEN'; page: open "
                                   f"/?token=TOKEN once); default ${TOKEN_ENV}")  # fmt: skip
    p.add_argument("--weights", dest="query_weights",
                   help="local copy of the store's weights file, for uploaded query images")  # fmt: skip
    p.add_argument("--device", dest="model.device", help="auto | cpu | cuda for uploaded query images")
    p.add_argument("--follow-seconds", type=float, default=5.0,
                   help="check the store for new, finished or removed images this often and serve them without a "
                        "restart (default 5; 0: serve the snapshot loaded at start)")  # fmt: skip
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest query image upload (default 20 MB)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages of this origin to call the API (repeatable; default: none)")  # fmt: skip
    add_index(p)
    add_common(p)
    add_cluster(p)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or a ConfigError that says what to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections whose socket says TCP, and
    # without it each response on a kept-alive connection waited ~40 ms for the client's delayed
    # ACK (Nagle): 124 ms against the app's 80 for a 1M-tile query from a Python client
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pass another --port (or --port 0)") from None
    sock.listen(2048)
    return sock


def main(args: argparse.Namespace, cfg: Config) -> int:
    token = args.token or os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        raise ConfigError(
            f"--host {args.host} lets other machines reach the store: pass --token TOKEN (or set ${TOKEN_ENV}), "
            "or keep the default --host 127.0.0.1"
        )
    if args.max_upload_mb <= 0:
        raise ConfigError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    sock = bind(args.host, args.port)  # before the index loads: a busy port fails at once

    import uvicorn

    from pipeline.cluster import runtime
    from pipeline.serve.app import create_app
    from pipeline.serve.service import Service

    with runtime(cfg.cluster) as rt:
        start = time.perf_counter()
        service = Service.open(args.store, rt, weights=args.query_weights, device=cfg.model.device,
                               max_upload=int(args.max_upload_mb * (1 << 20)), index_device=index_device(cfg),
                               index_dtype=cfg.search.dtype)  # fmt: skip
        tiles = int(service.tiles_per_image.sum())
        held = service.index.index_description()
        print(f"index of {tiles:,} tiles in {len(service.rings)} images loaded in {time.perf_counter() - start:.1f} s "
              f"({held['index_dtype']} on {held['index_device']})", flush=True)  # fmt: skip
        service.follow(args.follow_seconds)
        app = create_app(service, token, args.cors_origin)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(f"serving http://{shown}:{port}/" + (f"  (open http://{shown}:{port}/?token=TOKEN once)" if token else "")
              + "  Ctrl-C stops", flush=True)  # fmt: skip
        config = uvicorn.Config(app, log_level="info" if args.verbose else "warning", access_log=args.verbose)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        finally:
            service.close()
            sock.close()
    return 0
