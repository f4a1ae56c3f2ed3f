"""Throughput by path through relaymesh daemons in the lab: direct, peer relay, DERP (issue 6).

One lab per condition (clean; link: clean but every client's uplink a 300 Mbit/s kernel tbf;
impaired: 20 ms RTT and 0.5% loss on the client side): control + DERP
on ``srv``; ``a0``/``b0`` behind ``easy`` NATs (direct works); ``a1``/``b1`` behind ``hard`` NATs
(no direct path) with two relays on the lab internet: ``r`` (``RELAYMESH_RELAY_KERNEL=0``:
userspace forwarding, by the native loop, or by the Python loop with ``--python-relay``) and ``rk``
(``RELAYMESH_RELAY_KERNEL=1``: the nftables fast path), one on at a time; every other daemon gets
``=0`` too, and every daemon an explicit ``RELAYMESH_RELAY_NATIVE``, so the rows do not depend on
the daemon's defaults.
iperf3 TCP A -> B through the tunnel:

- ``direct``: a0 -> b0 on the path disco found;
- ``relay``: a1 -> b1 via ``r`` (``rk``'s relay port off);
- ``relay-kernel``: a1 -> b1 via ``rk`` (``r``'s relay port off);
- ``relay-kernel-easy`` (a control, not one of issue 6's rows): a2 -> b2, a second pair behind
  ``easy`` NATs like the direct pair, kept off the direct path with ``--path-policy
  PEER=no-direct``, via ``rk``: the relay path without the hard NATs, so "kernel relay vs direct"
  can be told apart from "hard NATs vs easy NATs";
- ``derp``: a1 -> b1 with ``--path-policy PEER=no-relay`` on both sides.

Congestion control is explicit, because it decides the impaired rows. The host's default may be
``bbr`` (network namespaces inherit it), and BBR ignores random loss: under 0.5% loss the DERP
path's outer TCP legs would look fine with bbr while Linux's default, ``cubic``, collapses. The
DERP server and the far side's kernels are not the tunnel user's to tune, while the user's own TCP
rides end to end on the UDP paths. So the impaired condition puts every TCP leg of the DERP path
(daemon -> DERP server -> daemon) on ``cubic`` (Linux's default) inside the clients' and the
DERP/control host's namespaces, and runs the inner iperf3 flow twice per path, with ``iperf3 -C
bbr`` and ``-C cubic``. The clean condition runs as before: every TCP with the namespaces'
inherited default (reported).

How the legs get cubic: ``sysctl net.ipv4.tcp_congestion_control=cubic`` inside a namespace fails
with EPERM when the host's ``net.ipv4.tcp_allowed_congestion_control`` does not list cubic (only
the initial namespace may default to a restricted algorithm; with a bbr host default the allowed
list is "reno bbr"), and widening that list is a host-global change. A route's ``congctl``
attribute is namespace-local and needs no permission beyond the namespace: every IPv4 route of
those namespaces gets ``congctl cubic`` before any daemon starts, so each TCP connection (active
or accepted) starts on cubic, while a socket's own choice (``iperf3 -C``) still wins. The bench
then reads the DERP connections' algorithm back with ``ss -ti`` and prints it (the "DERP legs"
column), so the table shows what the kernel used, not what was asked for.

In the clean condition every number is CPU-bound on the 2 shared vCPUs (iperf3 on both ends, two
daemons, the relay or DERP server; the receiving daemon's thread is the bottleneck, busy or
waiting for a CPU ~93% of the time): compare ratios, not absolute Mbit/s. There the relay's own
work (a receive and a send per batch, ~9% of a core at ~700 Mbit/s; or, on the kernel path, the
extra hop inside the sender's ``sendmsg``) comes out of the CPU the endpoints share, which a relay
on its own machine would not take. The link condition is the same lab with each client's uplink
limited to ``--link-mbit`` (300 Mbit/s by default, under half of what the CPU allows) by a kernel
``tbf``, as a real access link limits a real path: there the link, not the shared CPU, is the
bottleneck, so it shows whether a relay path keeps up with the direct one when the relay's work
is not charged to the endpoints. The impaired condition adds ``delay_ms=10`` on each client's
uplink (20 ms RTT) and ``loss_pct=0.5`` on the sender's.

Single runs of 8 s vary by up to 20% on this machine (the same direct path gave 671 and 828
Mbit/s minutes apart), more than the effects measured; so every path runs ``--rounds`` times
(default 5), interleaved (direct, relay, kernel relay, DERP, then again), and each row reports the
median round, with every round listed. The ratios are paired: relay/direct is worked out within
each round (the two runs seconds apart, under the same machine conditions) and the median of those
per-round ratios is reported, each round's listed. A ratio of the two medians would pair runs from
different rounds, and this host's speed drifts between rounds (every path ~20-25% slower in rounds
3 and 4 than in rounds 1 and 2 of the 2026-11-24 23:29 UTC run), which moves such a ratio by more
than the effects measured.

    sudo .venv/bin/python bench/paths.py [--seconds 8] [--rounds 5] [--link-mbit 300]
        [--no-clean] [--no-link] [--no-impaired] [--python-relay] [--no-write]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ROOT, IperfResult, cpu_seconds, median, update_doc_section
from relaymesh.lab import Lab, Topology
from relaymesh.lab.grid import SERVER_HOST, WG_PORT, MeshLab, derp_map, until

SECTION = "paths"
RELAY_PORT = 40000
POLICY = {
    "tagOwners": {"tag:relay": ["autogroup:member"]},
    "acls": [{"action": "accept", "src": ["*"], "dst": ["*:*"]}],
    "grants": [{"src": ["autogroup:member"], "dst": ["tag:relay"],
                "app": {"relaymesh.dev/cap/relay": [{}]}}],
}
PATHS = ("direct", "relay", "relay-kernel", "relay-kernel-easy", "derp")
CLIENTS = ("a0", "b0", "a1", "b1", "a2", "b2")
PAIRS = {"direct": ("a0", "b0"), "relay-kernel-easy": ("a2", "b2")}  # the rest: ("a1", "b1")
RELAY_OF = {"relay": "r", "relay-kernel": "rk", "relay-kernel-easy": "rk"}
CC_SYSCTL = "net.ipv4.tcp_congestion_control"
DERP_PORT = 3340  # relaymesh.lab.grid's DERP listen port
LEG_CC = "cubic"  # impaired: Linux's default, for every TCP leg the tunnel user does not own
INNER_CCS = ("bbr", "cubic")  # impaired: the user's own TCP, end to end
RELAY_KERNEL_ENV = "RELAYMESH_RELAY_KERNEL"
RELAY_NATIVE_ENV = "RELAYMESH_RELAY_NATIVE"
GOAL_DIRECT = 0.9  # issue 6: relay/direct >= 0.9
GOAL_DERP = 10.0  # issue 6: relay/DERP >= 10 under loss
CONDITIONS = ("clean", "link", "impaired")
LINK_MBIT = 300.0  # link condition: each client's uplink; under half the CPU-bound direct rate


@dataclass
class Row:
    """The iperf3 runs of one path and inner cc (one per round); ``result`` is the median."""

    path: str
    inner_cc: str  # "bbr", "cubic", or "<default> (default)" when not given
    legs: str  # what carries the tunnel: "UDP" or "TCP <cc>" (DERP)
    runs: list[IperfResult] = field(default_factory=list)
    note: str = ""  # e.g. the relay's forwarding mode as it reported it (last round)

    @property
    def result(self) -> IperfResult:
        """The median run by throughput (the lower middle one for an even count), whole: its
        CPU figures belong to that same run."""
        ranked = sorted(self.runs, key=lambda r: r.mbit_s)
        return ranked[(len(ranked) - 1) // 2]


def topology(cond: str, link_mbit: float = LINK_MBIT) -> Topology:
    """The lab of one of ``CONDITIONS``."""
    topo = Topology("pathsbench")
    for host, nat in (("a0", "easy"), ("b0", "easy"), ("a1", "hard"), ("b1", "hard"),
                      ("a2", "easy"), ("b2", "easy")):
        topo.add_host_behind(host, nat)
        if cond == "impaired":
            loss = 0.5 if host.startswith("a") else 0.0
            topo.set_impairment(host, delay_ms=10.0, loss_pct=loss)
        elif cond == "link":
            topo.set_impairment(host, rate_mbit=link_mbit)
    for h in ("r", "rk", SERVER_HOST):
        topo.add_host(h)
    return topo


def start(m: MeshLab, name: str, python_relay: bool = False) -> None:
    m.lab.exec(name, ["ip", "-6", "addr", "flush", "scope", "global"])
    m.lab.exec(name, ["ip", "-6", "route", "flush", "default"], check=False)
    cmd = ["relaymesh", "daemon", "--state-dir", str(m.root / f"{name}-state"),
           "--socket", m.sock(name), "--tun", "rm0", "--port", str(WG_PORT)]
    # explicit either way: the userspace row must not depend on the daemon's default
    env = {RELAY_KERNEL_ENV: "1" if name == "rk" else "0",
           RELAY_NATIVE_ENV: "0" if python_relay else "1"}
    p = m.lab.spawn(name, cmd, name="daemon", env=env)
    until(lambda: "listening on" in p.output() or not p.alive, 20, f"daemon {name}")
    m.daemons[name] = p
    args = ["up", "--login-server", m.url, "--auth-key", m.auth_key, "--hostname", name]
    if name in ("r", "rk"):
        args += ["--advertise-tags", "tag:relay", "--relay-server-port", str(RELAY_PORT)]
    m.cli(name, *args)


def via(m: MeshLab, a: str, b: str) -> str:
    return str((m.peer(a, b) or {}).get("via", ""))


def serve_from(m: MeshLab, on: str) -> None:
    """Relay ``on`` (``r`` or ``rk``) serves; the other one's relay port is off."""
    m.cli("rk" if on == "r" else "r", "set", "--relay-server-port=")
    m.cli(on, "set", "--relay-server-port", str(RELAY_PORT))


def wait_on(m: MeshLab, a: str, b: str, path: str, relay: str | None) -> None:
    """Until a<->b both report ``path``: peer relay ``relay``, or DERP when ``relay`` is None."""

    def ready() -> bool:
        m.echo(a, b, deadline=2, each=1)
        if relay is None:
            return m.path(a, b) == "derp" and m.path(b, a) == "derp"
        return all(via(m, x, y).startswith(f"peer-relay {relay} (") for x, y in ((a, b), (b, a)))
    until(ready, 60, f"{a}<->{b} on {path}", step=0.5)


def select(m: MeshLab, path: str) -> None:
    """Put a1<->b1 on ``path`` (relay via r, via rk, or DERP) and wait until both agree."""
    policy = "no-relay" if path == "derp" else "auto"
    for a, b in (("a1", "b1"), ("b1", "a1")):
        m.cli(a, "set", "--path-policy", f"{b}={policy}")
    relay = RELAY_OF.get(path)
    if relay is not None:
        serve_from(m, relay)
    wait_on(m, "a1", "b1", path, relay)


def select_easy(m: MeshLab) -> None:
    """The control pair a2<->b2 (easy NATs, ``--path-policy PEER=no-direct`` from the start) on
    the kernel relay ``rk``: the relay path without the hard NATs of the a1/b1 pair."""
    serve_from(m, "rk")
    wait_on(m, "a2", "b2", "relay-kernel-easy", "rk")


def cc_of(lab: Lab, host: str) -> str:
    """The namespace's default TCP congestion control, as its kernel reports it."""
    return lab.exec(host, ["sysctl", "-n", CC_SYSCTL]).stdout.strip()


def set_route_cc(lab: Lab, host: str, cc: str) -> None:
    """``congctl cc`` on every IPv4 route of ``host``'s main table (see the module docstring)."""
    routes = json.loads(lab.exec(host, ["ip", "-j", "-4", "route", "show", "table", "main"]).stdout)
    for r in routes:
        spec = [str(r["dst"])]
        for key, word in (("gateway", "via"), ("dev", "dev"), ("protocol", "proto"),
                          ("scope", "scope"), ("prefsrc", "src"), ("metric", "metric")):
            if key in r:
                spec += [word, str(r[key])]
        lab.exec(host, ["ip", "route", "replace", *spec, "congctl", cc])


def derp_leg_ccs(lab: Lab) -> str:
    """The congestion control the kernel reports (``ss -ti``) for the DERP TCP connections of
    a1, b1 and the DERP host, e.g. "cubic" or "bbr/cubic"."""
    seen: set[str] = set()
    for host in ("a1", "b1", SERVER_HOST):
        out = lab.exec(host, ["ss", "-tinH", "state", "established",
                              f"( sport = :{DERP_PORT} or dport = :{DERP_PORT} )"]).stdout
        for word in out.split():
            if word in ("cubic", "bbr", "reno", "bbr2", "bbr3", "dctcp", "htcp", "vegas"):
                seen.add(word)
    return "/".join(sorted(seen)) or "?"


def iperf_cc(lab: Lab, host: str, server_ip: str, seconds: float, pids: dict[str, int],
             cc: str | None) -> IperfResult:
    """One iperf3 TCP run ``host`` -> ``server_ip`` with ``-C cc`` (None: the namespace default),
    and the CPU of ``pids`` over it."""
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    t0 = time.monotonic()
    cmd = ["iperf3", "-c", server_ip, "-t", str(seconds), "-J", "--connect-timeout", "5000"]
    if cc is not None:
        cmd += ["-C", cc]
    cp = lab.exec(host, cmd, timeout=seconds + 60, check=False)
    wall = time.monotonic() - t0
    after = {k: cpu_seconds(p) for k, p in pids.items()}
    try:
        end = json.loads(cp.stdout)["end"]
        bps = float(end["sum_received"]["bits_per_second"])
        retr = int(end["sum_sent"].get("retransmits", 0))
        used = str(end.get("sender_tcp_congestion", cc or ""))
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"iperf3 failed ({e}): {cp.stdout[-800:]}{cp.stderr[-800:]}") from None
    if cc is not None and used and used != cc:
        raise RuntimeError(f"iperf3 asked for -C {cc} but the sender used {used}")
    return IperfResult(bps / 1e6, retr, {k: 100.0 * (after[k] - before[k]) / wall for k in pids})


def relay_counts(m: MeshLab, relay: str) -> tuple[int, int, str]:
    """The relay's own account: (kernel-forwarded packets, userspace-forwarded packets, mode).
    Kernel counters count skbs: a GSO super-packet from a sender is one."""
    sess = json.loads(m.cli(relay, "debug", "peer-relay-sessions", "--json").stdout)
    met = sess.get("metrics", {})
    if met.get("kernel"):
        mode = "kernel fast path"
    else:
        why = met.get("kernel_unavailable")
        loop = "native loop" if met.get("native") else "Python loop"
        if met.get("native_unavailable"):
            loop += f", native unavailable: {met['native_unavailable']}"
        mode = f"userspace ({loop})" + (f" (kernel unavailable: {why})" if why else "")
    return (int(met.get("kernel_forwarded_packets", 0)),
            int(met.get("userspace_forwarded_packets", 0)), mode)


def run_condition(cond: str, seconds: float, rounds: int, tmp: Path,
                  python_relay: bool = False, link_mbit: float = LINK_MBIT) -> list[Row]:
    impaired = cond == "impaired"
    with Lab(topology(cond, link_mbit), state_dir=None) as lab:
        if impaired:  # before any daemon or DERP server opens a TCP connection
            for h in (*CLIENTS, SERVER_HOST):
                set_route_cc(lab, h, LEG_CC)
        inner = [(cc, cc) for cc in INNER_CCS] if impaired else [
            (None, f"{cc_of(lab, 'a0')} (default)")]
        m = MeshLab(lab, tmp)
        m.start_derp("1a")
        m.start_control(derp_map([(1, [("1a", lab.address(SERVER_HOST))])]))
        (tmp / "paths-policy.json").write_text(json.dumps(POLICY))
        m.admin("policy", "set", "-f", str(tmp / "paths-policy.json"))
        with concurrent.futures.ThreadPoolExecutor(6) as ex:
            for f in [ex.submit(start, m, n, python_relay) for n in ("r", "rk", *CLIENTS)]:
                f.result()
        for a, b in (("a2", "b2"), ("b2", "a2")):
            m.cli(a, "set", "--path-policy", f"{b}=no-direct")
        for b in ("b0", "b1", "b2"):
            lab.spawn(b, ["iperf3", "-s"], name="iperf3")
        m.settle("a0", "b0")
        by_key: dict[tuple[str, str], Row] = {}
        for rnd in range(1, rounds + 1):
            for path in PATHS:
                a, b = PAIRS.get(path, ("a1", "b1"))
                if path == "relay-kernel-easy":
                    select_easy(m)
                elif path != "direct":
                    select(m, path)
                time.sleep(1.0)
                relay = RELAY_OF.get(path)
                pids = {"daemon A": m.daemons[a].pid, "daemon B": m.daemons[b].pid}
                if relay:
                    pids[f"relay {relay}"] = m.daemons[relay].pid
                else:
                    pids["DERP server"] = m.derps["1a"].pid
                for cc, label in inner:
                    before = relay_counts(m, relay) if relay else None
                    res = iperf_cc(lab, a, m.ipv4(b), seconds, pids, cc)
                    legs = f"TCP {derp_leg_ccs(lab)}" if path == "derp" else "UDP"
                    row = by_key.setdefault((path, label), Row(path, label, legs))
                    row.runs.append(res)
                    if relay and before:
                        k, u, mode = relay_counts(m, relay)
                        row.note = (f"{mode}; last round: {k - before[0]} skbs by the kernel (a "
                                    f"GSO batch counts once), {u - before[1]} datagrams by "
                                    f"userspace")
                    print(f"{cond:>8} round {rnd}/{rounds} {path:>12} inner {label:<15} legs "
                          f"{legs:<10}: {res.mbit_s:7.1f} Mbit/s, {res.retransmits} retr, "
                          + ", ".join(f"{k} {v:.0f}%" for k, v in res.cpu_pct.items()),
                          flush=True)
        rows = list(by_key.values())
    return rows


def _ratio(x: float, y: float) -> float:
    return x / y if y > 0 else float("inf")


RATIOS = {"user/direct": ("relay", "direct"), "kernel/direct": ("relay-kernel", "direct"),
          "kernel-easy/direct": ("relay-kernel-easy", "direct"), "user/derp": ("relay", "derp"),
          "kernel/derp": ("relay-kernel", "derp")}


def round_ratios(rows: list[Row]) -> dict[str, dict[str, list[float]]]:
    """Per inner cc and ratio name (``RATIOS``): one ratio per round, both runs of that round."""
    out: dict[str, dict[str, list[float]]] = {}
    by = {(r.path, r.inner_cc): r.runs for r in rows}
    for cc in dict.fromkeys(r.inner_cc for r in rows):
        out[cc] = {}
        for name, (num, den) in RATIOS.items():
            xs, ys = by.get((num, cc), []), by.get((den, cc), [])
            if xs and ys:  # every round runs every path, so both have one run per round
                out[cc][name] = [_ratio(x.mbit_s, y.mbit_s) for x, y in zip(xs, ys, strict=True)]
            else:
                out[cc][name] = []
    return out


def ratios(rows: list[Row]) -> dict[str, dict[str, float]]:
    """Per inner cc: the median per-round ratio for each of ``RATIOS`` (0.0 without runs)."""
    return {cc: {name: median(each) if each else 0.0 for name, each in rs.items()}
            for cc, rs in round_ratios(rows).items()}


def reading(results: dict[str, list[Row]]) -> list[str]:
    """Which goal is met where, from the numbers of this run, and why it splits that way."""
    met: dict[str, list[str]] = {"direct+": [], "direct-": [], "derp+": [], "derp-": []}
    for cond, rows in results.items():
        for cc, rs in ratios(rows).items():
            for relay in ("user", "kernel"):
                name = f"{cond} inner {cc} {'userspace' if relay == 'user' else 'kernel'} relay"
                ok = rs[f"{relay}/direct"] >= GOAL_DIRECT
                met["direct+" if ok else "direct-"].append(f"{name} ({rs[f'{relay}/direct']:.2f})")
                if cond == "impaired":
                    ok = rs[f"{relay}/derp"] >= GOAL_DERP
                    met["derp+" if ok else "derp-"].append(f"{name} ({rs[f'{relay}/derp']:.1f})")
    def names(key: str) -> str:
        return "; ".join(met[key]) or "none"

    out = [f"Reading. Goal relay/direct >= {GOAL_DIRECT}: met by {names('direct+')}; NOT met by "
           f"{names('direct-')}. Goal relay/DERP >= {GOAL_DERP:g} under loss: met by "
           f"{names('derp+')}; NOT met by {names('derp-')}."]
    imp = results.get("impaired")
    if imp:
        by = {(r.path, r.inner_cc): r.result.mbit_s for r in imp}
        rs = ratios(imp)
        derp_ok = {cc: [rs[cc][f"{k}/derp"] >= GOAL_DERP for k in ("user", "kernel")]
                   for cc in rs}
        split = ""
        if 0 < by.get(("direct", "cubic"), 0) < 50:
            split += (" With inner cubic every UDP path is loss-bound (Mathis' formula, 1.22 "
                      "MSS / (RTT sqrt(p)), gives a loss-based TCP about 10 Mbit/s at 0.5% loss "
                      "and 20 ms RTT), so the inner-cubic relay/direct ratios compare two "
                      "loss-limited figures and vary from run to run.")
        if all(derp_ok.get("bbr", [False])) and not any(derp_ok.get("cubic", [True])):
            split += (" So in this run relay/DERP >= 10 under loss holds exactly when the user's "
                     "own TCP is loss-tolerant (inner bbr) over DERP legs on Linux's default "
                     "(cubic); with a loss-based inner cc (cubic) the relay is no better than "
                     "DERP on a lossy path.")
        legs = next((r.legs for r in imp if r.path == "derp"), "TCP")
        out += [
            "",
            f"Why it splits by congestion control: on DERP the loss hits the outer {legs} legs "
            f"(daemon -> DERP server -> daemon), which retransmit it and back off, so the inner "
            f"flow sees a slow but lossless pipe and its own cc hardly matters (DERP "
            f"{by.get(('derp', 'bbr'), 0):.1f} Mbit/s with inner bbr, "
            f"{by.get(('derp', 'cubic'), 0):.1f} with inner cubic). On the UDP paths (direct, "
            f"peer relay) the inner flow meets the loss end to end: bbr does not treat random "
            f"loss as congestion and keeps its rate (relay {by.get(('relay', 'bbr'), 0):.1f}, "
            f"kernel relay {by.get(('relay-kernel', 'bbr'), 0):.1f} Mbit/s), cubic cuts its "
            f"window at every loss as the DERP legs do (relay "
            f"{by.get(('relay', 'cubic'), 0):.1f}, kernel relay "
            f"{by.get(('relay-kernel', 'cubic'), 0):.1f} Mbit/s)."
            + split
            + " With bbr on every DERP leg instead (this host's default, inherited by the lab "
            "namespaces; the 2026-11-24 16:32 UTC run, no explicit cc) DERP kept 150 Mbit/s "
            "under the same loss and relay/DERP was 1.4.",
        ]
    return out


def _show(mid: dict[str, float], each: dict[str, list[float]], name: str, fmt: str) -> str:
    """A paired ratio: its median, then every round's in brackets."""
    rounds = " ".join(format(x, fmt) for x in each[name])
    return f"{format(mid[name], fmt)} [{rounds}]"


def render(results: dict[str, list[Row]], args: argparse.Namespace) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        "## Paths: direct, peer relay, DERP (relaymesh daemons, lab)",
        "",
        f"`bench/paths.py --seconds {args.seconds:g} --rounds {args.rounds}"
        f"{' --python-relay' if args.python_relay else ''}"
        f"{'' if args.link_mbit == LINK_MBIT else f' --link-mbit {args.link_mbit:g}'}`, one run, "
        f"{stamp}.",
        f"{args.rounds} interleaved rounds, each over every path in turn; a row shows the median",
        "round (its CPU figures are that round's) and every round's Mbit/s. Ratios are paired:",
        "the median of the per-round ratios (each round's in brackets), as this host's speed",
        "drifts between rounds (see bench/paths.py). iperf3 TCP A -> B",
        "through the tunnel: direct between two easy NATs; via a peer relay between two hard",
        "NATs (relay `r` with `RELAYMESH_RELAY_KERNEL=0`: userspace forwarding, by the "
        + ("Python loop (`RELAYMESH_RELAY_NATIVE=0`)" if args.python_relay else
           "native loop (the default)") + "; relay `rk` with",
        "`=1`: the nftables fast path); via DERP (the hard pair with `--path-policy",
        "PEER=no-relay`). Impaired: 20 ms RTT, 0.5% loss on the sender's uplink, every TCP leg",
        f"of the DERP path (clients' and DERP host's namespaces) on `{LEG_CC}` (Linux's default;",
        "per-route `congctl`, see bench/paths.py; \"tunnel legs\" shows what `ss -ti` read back),",
        "the inner flow once with `iperf3 -C bbr` and once with `-C cubic`. Clean: every TCP on",
        "the namespaces' inherited default (shown). Link: as clean, with every client's uplink",
        f"limited to {args.link_mbit:g} Mbit/s by a kernel tbf, so the link and not the shared",
        "CPU is the bottleneck (see bench/paths.py).",
        "2 shared vCPUs run both iperf3 ends, both daemons and the relay or DERP server:",
        "compare ratios, not absolute figures.",
        "",
        "| condition | path | inner TCP cc | tunnel legs | Mbit/s (median) | rounds (Mbit/s) "
        "| retransmits | CPU % (per process) | relay forwarding |",
        "|---|---|---|---|---:|---|---:|---|---|",
    ]
    for cond, rows in results.items():
        for r in rows:
            cpu = ", ".join(f"{k} {v:.0f}" for k, v in r.result.cpu_pct.items())
            each = " / ".join(f"{x.mbit_s:.0f}" for x in r.runs)
            lines.append(f"| {cond} | {r.path} | {r.inner_cc} | {r.legs} | "
                         f"{r.result.mbit_s:.1f} | {each} | {r.result.retransmits} | {cpu} | "
                         f"{r.note or '-'} |")
    lines.append("")
    for cond, rows in results.items():
        legs = next((r.legs for r in rows if r.path == "derp"), "?")
        each = round_ratios(rows)
        for cc, rs in ratios(rows).items():
            show = functools.partial(_show, rs, each[cc])
            lines.append(textwrap.fill(
                f"- {cond}, inner {cc}, DERP legs {legs}: relay/direct "
                f"{show('user/direct', '.2f')} (userspace), {show('kernel/direct', '.2f')} "
                f"(kernel); relay/DERP {show('user/derp', '.1f')} (userspace), "
                f"{show('kernel/derp', '.1f')} (kernel); control: kernel relay between the easy "
                f"pair / direct {show('kernel-easy/direct', '.2f')}", width=100,
                subsequent_indent="  "))
    lines += [""] + [textwrap.fill(p, width=100) if p else p for p in reading(results)]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--rounds", type=int, default=5,
                    help="interleaved rounds over every path; each row reports the median")
    ap.add_argument("--link-mbit", type=float, default=LINK_MBIT,
                    help="the link condition's uplink rate per client")
    for cond in CONDITIONS:
        ap.add_argument(f"--no-{cond}", action="store_true", help=f"skip the {cond} condition")
    ap.add_argument("--python-relay", action="store_true",
                    help="relay r forwards with the Python loop, not the native one")
    ap.add_argument("--no-write", action="store_true", help="print only; docs untouched")
    args = ap.parse_args()
    results: dict[str, list[Row]] = {}
    t0 = time.monotonic()
    for cond in CONDITIONS:
        if getattr(args, f"no_{cond}"):
            continue
        with tempfile.TemporaryDirectory(prefix="rm-bench-paths-") as tmp:
            results[cond] = run_condition(cond, args.seconds, args.rounds, Path(tmp),
                                          args.python_relay, args.link_mbit)
    body = render(results, args)
    print(body)
    print(f"(bench time {time.monotonic() - t0:.0f} s)", flush=True)
    if not args.no_write:
        update_doc_section(ROOT / "docs" / "benchmarks.md", SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
