"""Top costs of a py-spy raw (collapsed) profile: self and inclusive time per function and per package.

python -m tests.load.profile_top docs/bench/profile-targeted.txt [--top 25]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _name(frame: str, lines: bool = False) -> tuple[str, str]:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip(), "?"
    path = m["file"]
    if "site-packages/" in path:
        short = path.split("site-packages/")[-1]
    else:  # the project's own files, relative to the checkout
        short = re.sub(r"^.*/(?=(service|tests)/)", "", path)
    short = re.sub(r"^.*/lib/python3\.\d+/", "stdlib/", short)
    label = f"{m['func']} ({short}{':' + m['line'] if lines and m['line'] else ''})"
    package = short.split("/")[0] if "/" in short else short
    if package == "stdlib":
        package = "stdlib/" + short.split("/")[1]
    return label, package


def analyse(path: Path, top: int = 25) -> str:
    self_t: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg_self: Counter[str] = Counter()
    total = 0
    for raw in path.read_text().splitlines():
        stack, _, count = raw.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f for f in stack.split(";") if f and not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        names = [_name(f) for f in frames]
        leaf, leaf_pkg = names[-1]
        self_t[leaf] += n
        pkg_self[leaf_pkg] += n
        for label in {label for label, _ in names}:
            incl[label] += n
    out = [f"{path.name}: {total} samples", "", "self time by package:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in pkg_self.most_common(12)]
    out += ["", "self time by function:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in self_t.most_common(top)]
    out += ["", "inclusive time by function:"]
    out += [f"  {100 * n / total:5.1f}%  {k}" for k, n in incl.most_common(top)]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="tests.load.profile_top")
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=25)
    ns = parser.parse_args()
    for f in ns.files:
        print(analyse(f, ns.top))
        print()


if __name__ == "__main__":
    main()
