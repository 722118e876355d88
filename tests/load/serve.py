"""How the Python comparison servers start: the command line every bench server takes, and the
service's own uvicorn setup (uvloop, httptools, the sans-I/O websockets protocol, no deflate)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import uvicorn


def command_line(prog: str, channel: str) -> argparse.Namespace:
    """`prog --port N --redis URL [--channel PREFIX]`, BENCH_SECRET in the environment (`secret`)."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--channel", default=channel)
    ns = parser.parse_args()
    ns.secret = os.environ["BENCH_SECRET"]
    return ns


def serve(prog: str, build: Callable[[str, str, str], Any], channel: str) -> None:
    """The app `build` makes on the service's uvicorn setup, from `command_line`."""
    ns = command_line(prog, channel)
    uvicorn.run(
        build(ns.redis, ns.channel, ns.secret),
        host="127.0.0.1",
        port=ns.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
    )
