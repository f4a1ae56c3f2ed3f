"""bench/paths' paired ratios: relay/direct is taken within each round, then the median."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import paths
from _common import IperfResult


def row(path: str, mbits: list[float]) -> paths.Row:
    r = paths.Row(path, "bbr", "UDP")
    r.runs = [IperfResult(x, 0, {}) for x in mbits]
    return r


def test_ratios_pair_runs_of_the_same_round() -> None:
    # the host slows down after round 2 (every path ~25% lower) and the relay has one bad
    # round. The medians of each path pair direct's round 3 (800) with the relay's round 5
    # (730): 0.91. Paired, the relay is 0.96 of direct in four rounds of five.
    rows = [row("direct", [1000, 980, 800, 750, 760]),
            row("relay", [960, 940, 610, 720, 730]),
            row("relay-kernel", [990, 970, 790, 740, 750]),
            row("relay-kernel-easy", [1000, 980, 800, 750, 760]),
            row("derp", [100, 98, 80, 75, 76])]
    each = paths.round_ratios(rows)["bbr"]
    assert [round(x, 3) for x in each["user/direct"]] == [0.96, 0.959, 0.762, 0.96, 0.961]
    mid = paths.ratios(rows)["bbr"]
    assert round(mid["user/direct"], 3) == 0.96
    assert mid["kernel-easy/direct"] == 1.0
    assert round(mid["kernel/derp"], 3) == 9.875


def test_ratio_without_runs_is_zero() -> None:
    rows = [row("direct", [1000]), row("relay", [900])]
    mid = paths.ratios(rows)["bbr"]
    assert round(mid["user/direct"], 2) == 0.9
    assert mid["kernel/direct"] == 0.0


def test_conditions_differ_only_in_the_clients_uplinks() -> None:
    # link: every client's uplink is a kernel tbf at the given rate and nothing else; clean:
    # no impairment at all; impaired: delay on every client, loss on the senders only
    link = paths.topology("link", 250.0)
    assert {h: (i.rate_mbit, i.needs_shaper) for h, i in link.impairments.items()} == {
        h: (250.0, False) for h in paths.CLIENTS}
    assert paths.topology("clean").impairments == {}
    imp = paths.topology("impaired").impairments
    assert {h: (i.delay_ms, i.loss_pct) for h, i in imp.items()} == {
        h: (10.0, 0.5 if h.startswith("a") else 0.0) for h in paths.CLIENTS}
