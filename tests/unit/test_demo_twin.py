"""The `make demo` story on the in-memory twin (relaymesh.demo_twin): what runs without root.

The twin runs the daemon's real sans-IO pieces (DiscoManager with its relay client, RelayServer on
r) on simulated NATs; these tests check that the story it tells is the lab demo's: a-c and b-c
direct, a-b through r, r's death moves a-b to DERP without losing packets once the mirror starts,
r's restart brings a-b back to the relay on a new session.
"""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from relaymesh import demo, demo_twin
from relaymesh.demo_twin import Story
from relaymesh.paths import Path


def _quiet() -> Console:
    return Console(file=io.StringIO(), width=100)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_twin_story_paths_failover_and_recovery(seed: int) -> None:
    res = demo_twin.run(_quiet(), seed=seed)
    assert res.settled_after is not None
    for pair in ("a->c", "c->a", "b->c", "c->b"):
        assert res.paths[pair] == "direct", res.paths
    for pair in ("a->b", "b->a"):
        assert res.paths[pair] == "peer_relay", res.paths
        assert res.via[pair].startswith("peer-relay r ("), res.via
    before = res.via["a->b"].rsplit("session ", 1)[1]
    # r died: b got a's packets over DERP, a switched to derp, and nothing was lost after the
    # first DERP copy (mirroring starts before the relay path is dropped)
    assert res.derp_copy_after is not None and res.derp_after is not None
    assert res.derp_copy_after <= res.derp_after
    assert res.lost_after_mirror == 0
    # r restarted: a fresh relay server, so a-b is back on a new session
    assert res.return_after is not None
    assert res.return_via.startswith("peer-relay r (") and not res.return_via.endswith(before)


def test_without_the_grant_a_b_stays_on_derp() -> None:
    """r refuses allocations the policy does not grant: hard/hard then has DERP only."""
    st = Story(1, grant=False)
    st.traffic([("a", "b"), ("a", "c")], 10.0)
    assert st.nodes["a"].path("b") is Path.DERP and st.nodes["b"].path("a") is Path.DERP
    assert st.nodes["a"].path("c") is Path.DIRECT
    relay = st.nodes["r"].relay
    assert relay is not None and len(relay) == 0 and relay.drops["not_allowed"] > 0


def test_without_root_the_demo_says_so_in_one_line_and_runs_the_twin(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    rc = demo.main([])
    out, err = capsys.readouterr()
    assert rc == 0, out
    assert len(err.strip().splitlines()) == 1 and "not root" in err
    assert "in-memory twin" in out and "peer_relay" in out and "r restarted" in out


IPERF_TEXT = """\
[  5] local 100.64.0.2 port 50810 connected to 100.64.0.3 port 5201
[ ID] Interval           Transfer     Bitrate         Retr  Cwnd
[  5]   0.00-1.00   sec  51.1 MBytes   429 Mbits/sec  3886    470 KBytes
[  5]   1.00-2.00   sec  0.00 Bytes  0.00 bits/sec   15   4.80 KBytes
[  5]   2.00-3.00   sec  74.4 KBytes   608 Kbits/sec   25   4.80 KBytes
- - - - - - - - - - - - - - - - - - - - - - - - -
[  5]   0.00-3.00   sec   139 MBytes   388 Mbits/sec  8347             sender
[  5]   0.00-3.01   sec   136 MBytes   379 Mbits/sec                  receiver
"""


def test_demo_reads_iperf3_per_second_lines_and_the_receiver_rate() -> None:
    """The lab demo's failover table comes from iperf3's text output (3.12 has no JSON stream)."""
    assert demo.parse_intervals(IPERF_TEXT) == [(0.0, 1.0, 429.0), (1.0, 2.0, 0.0),
                                                 (2.0, 3.0, pytest.approx(0.608))]
    assert demo._receiver_mbit(IPERF_TEXT) == 379.0
