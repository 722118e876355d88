"""The process: uvicorn subclassed to our limits, the acceptor, admission and connection ceilings, the
header timeout, the HTTP protocol's publish fast path, the WebSocket protocol and the GC pacer.

Every use of uvicorn's, websockets' and starlette's private internals lives here. May import
everything below it: the api and the layers under it."""
