"""The publish lane: a whole publish request in one read, split without httptools' callbacks.

A backend's keep-alive connection sends one small publish after another, and each one read by
httptools costs about ten calls back into Python (uvicorn's protocol and ours: the message's
begin, its URL, each header, the head's end, the body, the message's end) before the fast path
sees it. Once a connection has had a publish accepted, a read that holds exactly one complete
request in a strict subset of HTTP/1.1 is split here in a few C calls instead, and goes to the
same checks (`api.fastpath.prepare`) and the same answer (`server/httpprotocol.py`): about 4 % of
a replica's CPU per publish at 1,000 POST/s (docs/bench/profile.md).

`split` answers None for anything else, and the read then goes to httptools untouched (nothing
was consumed, and the parser is between requests): a head or body split over reads, a request
behind it, a method other than POST, HTTP/1.0, a query, a %-escape or an unusual byte in the
target, a header name that is not plain letters, digits and dashes, a value with a control,
non-ASCII or tab byte or with whitespace at its end, a Transfer-Encoding, Expect or Upgrade
header, a Connection header other than keep-alive, a missing, repeated or malformed
Content-Length, a body of another length. tests/test_publishlane.py holds the subset to httptools:
wherever `split` accepts a request, httptools reads the same method, target, headers and body.
"""

from __future__ import annotations

import re

from ..api.fastpath import Header
from .admission import MAX_HEAD_BYTES

# The whole head: the request line, then header lines (a value starts and ends with a visible byte).
_HEAD = re.compile(
    rb"POST (/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*) HTTP/1\.1"
    rb"(?:\r\n[A-Za-z0-9\-]+:[ \t]*[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)*"
)
# Headers that change how the request is framed or answered: httptools' business.
_REFUSED = frozenset((b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer"))


def split(data: bytes, max_body: int) -> tuple[str, list[Header], bytes] | None:
    """(path, headers with lower-case names, body) of the one publish request `data` holds, or None."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD_BYTES:
        return None
    head = data[:end]
    matched = _HEAD.fullmatch(head)
    if matched is None:
        return None
    headers: list[Header] = []
    length = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.lower()
        value = value.lstrip(b" \t")
        if name == b"content-length":
            if length is not None or not value.isdigit() or len(value) > 9:
                return None
            length = int(value)
        elif name in _REFUSED or (name == b"connection" and value.lower() != b"keep-alive"):
            return None
        headers.append((name, value))
    body = data[end + 4 :]
    if length is None or length != len(body) or length > max_body:
        return None
    return matched[1].decode("ascii"), headers, body
