"""Devices in Redis, beside the user's stream: `<prefix>:{u:<user>}:d` (id -> device JSON) and
`...:do` (id by registration order). Both carry the user's stream as their hash tag, so each script
touches one slot and runs on one Redis, under Sentinel and on a Cluster alike. No expiry: devices
outlive every replica, and leave when the user, the cap or the push service removes them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ..broker.redis.pipeline import Lua
from .devices import Device

# A registration order that two registrations in the same millisecond cannot tie: a counter kept in
# the hash under a field no device id can be ('#' is outside the id's alphabet).
_PUT = Lua.of(
    """
local seq = redis.call('HINCRBY', KEYS[1], '#seq', 1)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], seq, ARGV[1])
local over = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[3])
if over <= 0 then return {} end
local dropped = redis.call('ZRANGE', KEYS[2], 0, over - 1)
local devices = redis.call('HMGET', KEYS[1], unpack(dropped))
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, over - 1)
redis.call('HDEL', KEYS[1], unpack(dropped))
return devices
"""
)
_LIST = Lua.of(
    """
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
if #ids == 0 then return {} end
return redis.call('HMGET', KEYS[1], unpack(ids))
"""
)
_REMOVE = Lua.of(
    """
local device = redis.call('HGET', KEYS[1], ARGV[1])
if ARGV[2] ~= '' and device ~= ARGV[2] then return false end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('ZCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[1]) end
return device
"""
)
_KEYS = ("d", "do")


class UserScripts(Protocol):
    """The broker's one door for data kept beside a user's stream (RedisBroker.user_script)."""

    async def user_script(
        self, user_id: str, script: Lua, suffixes: Sequence[str], args: Sequence[str | int]
    ) -> Any: ...


class RedisDevices:
    """Devices on the broker's own connections (its pipeline, its cluster routing, its deadline)."""

    def __init__(self, broker: UserScripts, cap: int) -> None:
        self._broker = broker
        self._cap = cap

    async def put(self, user_id: str, device: Device) -> list[Device]:
        dropped = await self._broker.user_script(user_id, _PUT, _KEYS, [device.id, device.to_json(), self._cap])
        return [Device.from_json(text) for text in dropped if text]

    async def list(self, user_id: str) -> list[Device]:
        found = await self._broker.user_script(user_id, _LIST, _KEYS, [])
        return [Device.from_json(text) for text in found if text is not None]

    async def remove(self, user_id: str, device_id: str, only: Device | None = None) -> Device | None:
        expected = only.to_json() if only is not None else ""
        removed = await self._broker.user_script(user_id, _REMOVE, _KEYS, [device_id, expected])
        return Device.from_json(removed) if removed else None
