"""The hub's own bookkeeping when the broker under it fails: the embedded broker, made to refuse a
subscribe or an unsubscribe, under the real hub and real connections (no socket is needed to be
a member of a stream)."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from service.broker.memory import MemoryBroker
from service.config.settings import Settings
from service.core.errors import BrokerUnavailable
from service.core.streams import StreamRules, topic_stream
from service.delivery.connection import Connection
from service.delivery.hub import REMOVE, Hub, control
from service.telemetry.metrics import Metrics

TOPIC = "chat:lobby"


class RefusingBroker(MemoryBroker):
    """The embedded broker, refusing the next subscribe (or every unsubscribe) it is asked for."""

    refuse_subscribe = 0
    refuse_unsubscribe = False

    async def subscribe(self, stream: str) -> None:
        if self.refuse_subscribe:
            self.refuse_subscribe -= 1
            await asyncio.sleep(0.05)  # a second member joins meanwhile
            raise BrokerUnavailable("subscribe refused")
        await super().subscribe(stream)

    async def unsubscribe(self, stream: str) -> None:
        if self.refuse_unsubscribe:
            raise RuntimeError("unsubscribe refused")
        await super().unsubscribe(stream)


async def _noop_closer(code: int, reason: str) -> None:
    return None


@pytest.fixture
async def hub() -> tuple[Hub, RefusingBroker, Metrics, Settings]:
    settings = Settings(jwt_secret="x" * 32)
    metrics = Metrics("test")
    broker = RefusingBroker(settings, "test", lambda stream: StreamRules())
    hub = Hub(broker, metrics, settings.max_connections_per_user)
    await broker.start(hub.on_frame, _lost)
    yield hub, broker, metrics, settings
    await broker.stop()


async def _lost() -> None:
    return None


async def member(hub: Hub, settings: Settings, metrics: Metrics, user: str) -> Connection:
    conn = Connection(user, time.time() + 3600, settings, metrics, _noop_closer)
    await hub.register(conn)
    return conn


async def test_a_stream_whose_subscribe_failed_keeps_no_member(hub):
    """The first member's subscribe fails while a second member waits on it: both joins fail, and
    the next join subscribes the stream (before, the members stayed and nobody subscribed it)."""
    hub_, broker, metrics, settings = hub
    first, second, third = [await member(hub_, settings, metrics, user) for user in ("a", "b", "c")]
    broker.refuse_subscribe = 1
    outcomes = await asyncio.gather(
        hub_.join(first, TOPIC, StreamRules()), hub_.join(second, TOPIC, StreamRules()), return_exceptions=True
    )
    assert all(isinstance(outcome, BrokerUnavailable) for outcome in outcomes), outcomes
    assert not first.topics and not second.topics
    assert (await broker.members(topic_stream(TOPIC), 10)) == ([], 0)
    assert await hub_.join(third, TOPIC, StreamRules()) == 1
    published = await broker.publish(topic_stream(TOPIC), '"e"', "1", None)
    assert published.online == 1
    assert topic_stream(TOPIC) in broker._subscribed, "the stream is subscribed for its member"


async def test_a_failed_background_task_is_logged_and_counted(hub, caplog):
    """A member removed by a moderator leaves in the background, releasing the stream: when that
    fails, the failure is logged and counted (before, the task was dropped and its error unseen)."""
    hub_, broker, metrics, settings = hub
    conn = await member(hub_, settings, metrics, "a")
    assert await hub_.join(conn, TOPIC, StreamRules()) == 1
    broker.refuse_unsubscribe = True
    with caplog.at_level(logging.ERROR, logger="service.hub"):
        await broker.send(topic_stream(TOPIC), control(REMOVE, "a"))
        assert not conn.topics, "removed from the topic at once"
        for _ in range(100):
            if metrics.task_failures._value.get():
                break
            await asyncio.sleep(0.01)
    assert metrics.task_failures._value.get() == 1
    assert any("unsubscribe refused" in str(record.exc_info) for record in caplog.records)
