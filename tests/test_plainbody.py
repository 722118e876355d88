"""The fast path's plain body (`api.fastpath.plain`), held to the model: wherever it reads a body,
the model reads the same event and data from it; what it leaves is left to the model."""

from __future__ import annotations

import random

import orjson
import pytest
from pydantic import ValidationError

from service.api.fastpath import plain
from service.api.models import NotifyRequest

from .mutations import compare

SEEDS = [
    b'{"event":"order.shipped","data":{"order":7,"items":[1,2.5,-0.0,1e300,null,true,"x"]}}',
    b'{"data":"\\u00e9\\ud83d\\ude00\\n","event":"caf\\u00e9"}',
    b'{"event":"e","data":18446744073709551615}',
    b' {"event" : "a" , "event":"b"} ',
    b'{"event":"a","data":' + b"[" * 199 + b"]" * 199 + b"}",
]

# Bytes a mutation may insert: JSON's punctuation, escapes, digits and odd characters.
PALETTE = b'{}[]":,\\ \t\n0123456789.eE+-uaxntf\x00\x1f\x7f\xc3\xa9\xff'


def _agrees_with_the_model(body: bytes) -> None:
    read = plain(body)
    assert read is not None
    model = NotifyRequest.model_validate_json(body)  # raises if the model refuses what plain took
    assert model.event == read.event and model.fallback is None and model.push is None, body
    assert orjson.dumps(model.data) == orjson.dumps(read.data), body


def test_what_plain_reads_the_model_reads_the_same():
    taken, left = compare(random.Random(7), SEEDS, PALETTE, plain, _agrees_with_the_model)
    assert taken > 1_000 and left > 5_000, (taken, left)


@pytest.mark.parametrize(
    "body",
    [
        b'{"event":"a","data":123456789012345678901}',  # past 64 bits: orjson would read a float
        b'{"event":"a","data":-9223372036854775809}',
        b'{"event":"a","data":' + b"[" * 201 + b"]" * 201 + b"}",  # past the model's nesting limit
        b'{"event":"a","data":NaN}',
        b'{"event":"a","data":1e400}',
        b'{"event":""}',
        b'{"event":"' + b"x" * 129 + b'"}',
        b'{"event":"a\\u0007"}',
        b'{"event":1}',
        b'{"data":1}',
        b'{"event":"a","fallback":{"when":"offline"}}',
        b'{"event":"a","extra":1}',
        b'["event"]',
        b'\xef\xbb\xbf{"event":"a"}',
    ],
)
def test_plain_leaves_the_rest_to_the_model(body):
    assert plain(body) is None


@pytest.mark.parametrize(
    "body", [b'{"event":"a","data":123456789012345678901}', b'{"event":"a","data":' + b"[" * 201 + b"]" * 201 + b"}"]
)
def test_the_service_refuses_what_plain_leaves_for_that_reason(body):
    """The two checks that send a body to the model are not there for nothing: where orjson would
    read these (the integer as a float), the model refuses them, or the publish does when it encodes
    the data (`api.publish._publish`: 422, integers past 64 bits)."""
    with pytest.raises((ValidationError, orjson.JSONEncodeError)):
        orjson.dumps(NotifyRequest.model_validate_json(body).data)
