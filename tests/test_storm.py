"""A small reconnect storm (tests/load/storm.py): three replicas behind nginx, one SIGKILLed.

`make storm` runs the full one (2,000 sockets a replica; docs/reliability.md, "Reconnect storm").
"""

from __future__ import annotations

import pytest

from tests.load.storm import Config, _cluster_module, report, run


@pytest.mark.slow
async def test_small_reconnect_storm_loses_nothing():
    """150 sockets a replica, 60 publishes a second through nginx, the replica with the most
    sockets SIGKILLed: every one of its sockets is welcomed again on the other two and resumes
    from its cursors; no notification answered 202 is lost or arrives twice on any socket, and
    the sockets that did not move receive all along."""
    if _cluster_module().nginx_binary() is None:
        pytest.fail("nginx is not installed: run `apt-get install -y nginx` (Debian's package; `make install` does it)")
    result = await run(
        Config(sockets_per_replica=150, rate=60, before=4, after=2, workers=2, window=2), say=lambda *_: None
    )
    print("\n" + report(result))
    assert result["every_socket_back"], result["reconnected_s"]
    assert result["moved"] == result["killed_sockets"] == 150
    assert result["unmoved"] == 300
    assert result["lost"] == 0 and result["duplicates"] == 0
    assert result["gave_up"] == [] and result["publish_failed"] == 0
    assert result["accepted"] == result["published"] >= 60 * 6
    assert result["reconnected_s"]["max"] < 10
    assert result["unmoved_latency"]["after"]["deliveries"] > 0
