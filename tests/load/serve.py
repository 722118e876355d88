"""How the Python comparison servers start: the command line every bench server takes, and the
service's own uvicorn setup (uvloop, httptools, the sans-I/O websockets protocol, no deflate)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import uvicorn


def serve(prog: str, build: Callable[[str, str, str], Any], channel: str) -> None:
    """`prog --port N --redis URL [--channel PREFIX]`, BENCH_SECRET in the environment."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--channel", default=channel)
    ns = parser.parse_args()
    uvicorn.run(
        build(ns.redis, ns.channel, os.environ["BENCH_SECRET"]),
        host="127.0.0.1",
        port=ns.port,
        loop="uvloop",
        http="httptools",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        log_level="warning",
        access_log=False,
    )
