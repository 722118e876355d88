"""Random edits of a byte string, for the tests that hold a second reading of some input (the
publish lane's HTTP, the plain body's JSON) to the library that reads it first."""

from __future__ import annotations

import random
from collections.abc import Callable


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


def compare(
    rng: random.Random,
    seeds: list[bytes],
    palette: bytes,
    reads: Callable[[bytes], object | None],
    agrees: Callable[[bytes], None],
    rounds: int = 20_000,
    lines: bool = False,
) -> tuple[int, int]:
    """Mutate the seeds in turn `rounds` times; for each mutation `reads` takes (not None), call
    `agrees`, which asserts that the first reader reads it the same. (taken, left) counted."""
    taken = left = 0
    for n in range(rounds):
        data = mutated(rng, seeds[n % len(seeds)], palette, lines)
        if reads(data) is None:
            left += 1
        else:
            taken += 1
            agrees(data)
    return taken, left
