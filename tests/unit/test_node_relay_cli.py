"""CLI views of peer relays: status lines and `debug peer-relay-sessions` (pure renderers)."""

from __future__ import annotations

from relaymesh.cli.debug import render_sessions
from relaymesh.cli.status import render


def test_status_shows_the_relay_path_and_this_nodes_relay_port() -> None:
    st = {"self": {"addresses": ["100.64.0.2/32"], "name": "r", "user": "alice",
                   "relay_server_port": 40000},
          "peers": [{"addresses": ["100.64.0.3/32"], "name": "b", "path": "peer_relay",
                     "via": "peer-relay r (198.18.7.2:40000, session 42)", "online": True}]}
    lines = render(st, 0.0)
    assert lines[0].endswith("self  peer relay on UDP 40000")
    assert "peer-relay r (198.18.7.2:40000, session 42)" in lines[1]
    st["self"]["relay_server_port"] = None  # type: ignore[index]
    assert render(st, 0.0)[0].endswith("self")


def test_peer_relay_sessions_lists_names_addresses_and_traffic_each_way() -> None:
    r = {"port": 40000, "candidates": ["198.18.7.2:40000"],
         "sessions": [{"session_id": 42, "state": "bound", "names": ["a", "b"],
                       "addrs": ["198.18.1.2:1234", None], "packets": [10, 20],
                       "bytes": [1000, 2000], "kernel": True}],
         "metrics": {"drops": {"not_allowed": 3}}}
    lines = render_sessions(r)
    assert lines[0] == "relay port 40000, candidates 198.18.7.2:40000"
    assert lines[1] == ("session 42 bound kernel: a (198.18.1.2:1234) -> b (unbound) 10 pkts "
                        "1000 B; b -> a 20 pkts 2000 B")
    assert lines[2] == "drops: not_allowed 3"
    assert render_sessions({"port": 1, "sessions": []})[1] == "no sessions"


def test_status_columns_widen_so_a_long_via_never_runs_into_the_counters() -> None:
    via = "peer-relay relay-with-a-long-name (198.18.107.222:40000, session 16777215)"
    st = {"self": {"addresses": ["100.64.0.2/32"], "name": "a", "user": "alice"},
          "peers": [{"addresses": ["100.64.0.3/32"], "name": "b", "via": via, "online": True},
                    {"addresses": ["100.64.0.4/32"], "name": "c", "via": "derp(900)",
                     "online": True}]}
    lines = render(st, 0.0)
    assert f"{via}  tx 0" in lines[1]
    # every peer's counters start in the same column
    assert lines[1].index("tx 0") == lines[2].index("tx 0")
