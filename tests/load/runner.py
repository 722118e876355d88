"""Run one replica of the service with a different uvicorn setup, to weigh server-level levers.

    python -m tests.load.runner --port 8000 [--ws wsproto|websockets|websockets-sansio]
        [--http h11|httptools] [--loop asyncio|uvloop] [--patch async-runtime-dep]

The app and every other setting are exactly what `python -m service` builds (service.server.build_server).
`--patch` applies an in-memory change to the service for a measurement, before the app is imported:

- `async-runtime-dep`: the `get_runtime` dependency as `async def`; FastAPI runs a plain `def`
  dependency in a worker thread, once per request.
"""

from __future__ import annotations

import argparse


def _async_runtime_dep() -> None:
    import service.api.deps as deps

    async def get_runtime(request):  # type: ignore[no-untyped-def]
        return request.state.runtime

    deps.get_runtime.__code__ = get_runtime.__code__


PATCHES = {"async-runtime-dep": _async_runtime_dep}


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.load.runner")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ws", default=None)
    parser.add_argument("--http", default=None)
    parser.add_argument("--loop", default=None)
    parser.add_argument("--patch", action="append", default=[], choices=sorted(PATCHES))
    ns = parser.parse_args()
    for name in ns.patch:
        PATCHES[name]()
    from service.config.settings import Settings
    from service.server.runner import build_server

    server = build_server(Settings(), "127.0.0.1", ns.port)
    for key in ("ws", "http", "loop"):
        value = getattr(ns, key)
        if value:
            setattr(server.config, key, value)
    server.run()


if __name__ == "__main__":
    main()
