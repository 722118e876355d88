"""RedisChecks: due checks in Redis, spread over hash-tagged shards by user, shared by every replica.

Per shard (`<prefix>:{fc3}:...`, one slot of a Cluster): `due` (zset check -> when due, or when
its lease runs out once claimed, ms), `check` (hash check -> payload), and one string per check,
`st:<check>`, its state, expiring when the notification would have left history. A check is named
`<user>\\n<id>` (a user id holds no control character). On a single Redis a publish writes its
check itself, in the same script (`for_publish`, the broker's scripts.PUBLISH_CHECKED), alike.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from ..broker import PublishCheck
from ..broker.redis.broker import RedisBroker
from ..broker.redis.pipeline import Lua
from .checks import PENDING, DueCheck

# Enough tags that no one slot (so no one primary of a cluster) carries every check.
SHARDS = 8

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: due, check, state. ARGV: check, delay ms, payload, state, keep ms.
SCHEDULE = Lua.of(
    _NOW
    + """
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[5])
return 1
"""
)

# KEYS: state. ARGV: state, keep ms.
RECORD = Lua.of("return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])")

# KEYS: state.
STATE = Lua.of("return redis.call('GET', KEYS[1])")

# KEYS: due, check. ARGV: limit, lease ms. Up to `limit` due checks, leased to the caller by moving
# them that far into the future: a replica that dies holding one leaves it due again when the lease
# runs out. Returns check, payload, for each.
CLAIM = Lua.of(
    _NOW
    + """
local out = {}
for _, c in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))) do
  local payload = redis.call('HGET', KEYS[2], c)
  if payload then
    redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), c)
    out[#out + 1] = c
    out[#out + 1] = payload
  else
    redis.call('ZREM', KEYS[1], c)
  end
end
return out
"""
)

# KEYS: due, check, state. ARGV: check, state. Done: forgotten, its state kept as long as it was.
SETTLE = Lua.of(
    """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local keep = redis.call('PTTL', KEYS[3])
if keep > 0 then redis.call('SET', KEYS[3], ARGV[2], 'PX', keep) end
return 1
"""
)


class RedisChecks:
    def __init__(self, broker: RedisBroker, lease_seconds: float) -> None:
        self._broker = broker
        self._prefix = broker.prefix
        self._lease_ms = int(lease_seconds * 1000)

    def _key(self, shard: int, name: str) -> str:
        return f"{self._prefix}:{{fc{shard}}}:{name}"

    def _at(self, user: str, notification_id: str) -> tuple[int, str, str]:
        """The shard, the check's name and its state key."""
        shard = zlib.crc32(user.encode()) % SHARDS
        name = f"{user}\n{notification_id}"
        return shard, name, self._key(shard, "st:" + name)

    async def _run(self, script: Lua, keys: list[str], args: list[str | int]) -> Any:
        return await self._broker.evaluate(script, keys, args)

    async def schedule(self, user: str, notification_id: str, delay: float, payload: str, keep: float) -> None:
        shard, name, state = self._at(user, notification_id)
        keys = [self._key(shard, "due"), self._key(shard, "check"), state]
        await self._run(SCHEDULE, keys, [name, int(delay * 1000), payload, PENDING, int(keep * 1000)])

    def for_publish(self, user: str, delay: float, keep: float, head: str, tail: str) -> PublishCheck | None:
        shard = zlib.crc32(user.encode()) % SHARDS
        due, payloads, state = self._key(shard, "due"), self._key(shard, "check"), self._key(shard, "st:")
        return PublishCheck(due, payloads, state, f"{user}\n", int(delay * 1000), int(keep * 1000), head, tail)

    async def record(self, user: str, notification_id: str, state: str, keep: float) -> None:
        _, _, key = self._at(user, notification_id)
        await self._run(RECORD, [key], [state, int(keep * 1000)])

    async def state(self, user: str, notification_id: str) -> str | None:
        _, _, key = self._at(user, notification_id)
        found = await self._run(STATE, [key], [])
        return found.decode() if isinstance(found, bytes) else found

    async def claim(self, limit: int) -> list[DueCheck]:
        each = max(1, -(-limit // SHARDS))
        keys = [[self._key(s, "due"), self._key(s, "check")] for s in range(SHARDS)]
        replies = await asyncio.gather(*(self._run(CLAIM, k, [each, self._lease_ms]) for k in keys))
        claimed = []
        for reply in replies:
            for i in range(0, len(reply), 2):
                user, _, notification_id = reply[i].partition("\n")
                claimed.append(DueCheck(user, notification_id, reply[i + 1]))
        return claimed

    async def settle(self, check: DueCheck, state: str) -> None:
        shard, name, key = self._at(check.user, check.notification_id)
        await self._run(SETTLE, [self._key(shard, "due"), self._key(shard, "check"), key], [name, state])
