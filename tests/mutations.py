"""Random edits of a byte string, for the tests that hold a second reading of some input (the
publish lane's HTTP, the plain body's JSON) to the library that reads it first."""

from __future__ import annotations

import random


def mutated(rng: random.Random, data: bytes, palette: bytes, lines: bool = False) -> bytes:
    """`data` with one to three edits: a byte of `palette` inserted, a byte deleted or replaced by
    one of `palette`; with `lines`, sometimes a CRLF-separated line repeated instead (a second
    header of the same name, say)."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        at = rng.randrange(len(out) + 1)
        kind = rng.random()
        if kind < 0.4:
            out[at:at] = bytes([rng.choice(palette)])
        elif kind < 0.7 and at < len(out):
            del out[at]
        elif (kind < 0.85 or not lines) and at < len(out):
            out[at] = rng.choice(palette)
        elif lines:
            found = bytes(out).split(b"\r\n")
            if len(found) > 3:
                i = rng.randrange(1, len(found) - 2)
                found.insert(i, found[i])
                out = bytearray(b"\r\n".join(found))
    return bytes(out)
