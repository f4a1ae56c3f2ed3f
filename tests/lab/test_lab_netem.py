"""Impairment on a host's uplink is what the packets actually experience.

This kernel has no sch_netem: delay, jitter and loss come from the lab's userspace shaper
(relaymesh.lab.shaper) and rate from a kernel tbf; these tests hold either implementation to the
configured numbers.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable

import pytest

from relaymesh.lab import Lab, Topology

pytestmark = pytest.mark.lab
LabFactory = Callable[..., Lab]


def _start_echo(lab: Lab, host: str, port: int) -> None:
    p = lab.spawn(host, ["python", "-m", "relaymesh.lab.probe", "udp-echo", "--port", str(port),
                         "--max-seconds", "60"], name=f"echo{port}")
    p.wait_for("ready")


def _ping(lab: Lab, host: str, dst: str, port: int, count: int,
          interval: float) -> dict[str, list[float] | int]:
    cp = lab.python(host, ["udp-ping", dst, str(port), "--count", str(count),
                           "--interval", str(interval), "--timeout", "1.0"], timeout=60)
    result: dict[str, list[float] | int] = json.loads(cp.stdout)
    return result


@pytest.fixture
def impaired_lab(lab_factory: LabFactory) -> Lab:
    topo = Topology("netem")
    topo.add_network("lan", nat="easy")
    topo.add_host("slow", network="lan")  # behind a NAT, 40 ms added
    topo.add_host("jit")                  # on the internet, 30 +- 10 ms
    topo.add_host("lossy")                # on the internet, 10 % loss
    topo.add_host("base", network="lan")  # same path as "slow", unimpaired
    topo.add_host("r")
    topo.set_impairment("slow", delay_ms=40)
    topo.set_impairment("jit", delay_ms=30, jitter_ms=10)
    topo.set_impairment("lossy", loss_pct=10)
    lab = lab_factory(topo)
    _start_echo(lab, "r", 7000)
    return lab


def test_added_rtt_is_the_configured_delay(impaired_lab: Lab) -> None:
    lab = impaired_lab
    r = lab.address("r")
    base = _ping(lab, "base", r, 7000, 50, 0.01)
    slow = _ping(lab, "slow", r, 7000, 50, 0.01)
    assert base["received"] == 50 and slow["received"] == 50
    assert isinstance(base["rtts_ms"], list) and isinstance(slow["rtts_ms"], list)
    added = statistics.median(slow["rtts_ms"]) - statistics.median(base["rtts_ms"])
    assert 40 * 0.8 <= added <= 40 * 1.2, f"added RTT {added:.2f} ms for 40 ms configured"
    # IPv6 goes through the same uplink shaper.
    r6 = lab.address6("r")
    assert r6 is not None
    p6 = lab.spawn("r", ["python", "-m", "relaymesh.lab.probe", "udp-echo", "--bind", "::",
                         "--port", "7006", "--max-seconds", "30"], name="echo6")
    p6.wait_for("ready")
    slow6 = _ping(lab, "slow", r6, 7006, 20, 0.01)
    assert isinstance(slow6["rtts_ms"], list) and slow6["received"] == 20
    assert 40 * 0.8 <= statistics.median(slow6["rtts_ms"]) <= 40 * 1.2 + 5


def test_jitter_spreads_rtt_within_the_configured_band(impaired_lab: Lab) -> None:
    res = _ping(impaired_lab, "jit", impaired_lab.address("r"), 7000, 200, 0.005)
    rtts = res["rtts_ms"]
    assert isinstance(rtts, list) and len(rtts) == 200
    # Uniform in [20, 40] ms plus a sub-millisecond base path. Scheduling on a busy machine only
    # ever adds latency, so the lower bound is strict and the upper one is taken at the 90th
    # percentile.
    ordered = sorted(rtts)
    assert ordered[0] >= 20 * 0.95
    assert ordered[int(len(ordered) * 0.9)] <= 40 * 1.1 + 2
    assert statistics.pstdev(rtts) > 3.0  # uniform over 20 ms has sd ~5.8 ms; none would be ~0
    assert 30 * 0.8 <= statistics.median(rtts) <= 30 * 1.2


def test_loss_rate_over_2000_probes(impaired_lab: Lab) -> None:
    res = _ping(impaired_lab, "lossy", impaired_lab.address("r"), 7000, 2000, 0.001)
    sent, received = res["sent"], res["received"]
    assert isinstance(sent, int) and isinstance(received, int)
    loss = 100.0 * (sent - received) / sent
    # Binomial sd at n=2000, p=0.1 is 0.67 percentage points: +-3 points is ~4.5 sd.
    assert 7.0 <= loss <= 13.0, f"measured {loss:.2f}% loss for 10% configured"


def test_rate_limit_caps_throughput(lab_factory: LabFactory) -> None:
    topo = Topology("rate")
    topo.add_host("a")
    topo.add_host("r")
    topo.set_impairment("a", rate_mbit=20)
    lab = lab_factory(topo)
    sink = (
        "import socket,time\n"
        "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        "s.bind(('0.0.0.0',7100));s.listen(1);s.settimeout(20);print('ready',flush=True)\n"
        "c,_=s.accept();n=0;t0=None\n"
        "while True:\n"
        "  d=c.recv(65536)\n"
        "  if not d: break\n"
        "  t0=t0 or time.monotonic();n+=len(d)\n"
        "print('RESULT',n,time.monotonic()-t0,flush=True)\n"
    )
    p = lab.spawn("r", ["python", "-c", sink], name="sink")
    p.wait_for("ready")
    send = (f"import socket;s=socket.create_connection(('{lab.address('r')}',7100));"
            "s.sendall(b'x'*2_500_000);s.close()")
    lab.exec("a", ["python", "-c", send], timeout=30)
    p.wait(20)
    line = next(ln for ln in p.output().splitlines() if ln.startswith("RESULT"))
    n, secs = int(line.split()[1]), float(line.split()[2])
    mbit = n * 8 / secs / 1e6
    assert 20 * 0.75 <= mbit <= 20 * 1.1, f"{mbit:.1f} Mbit/s through a 20 Mbit/s limit"


def _tx_packets(lab: Lab, host: str, dev: str) -> int:
    out = lab.exec(host, ["cat", f"/sys/class/net/{dev}/statistics/tx_packets"]).stdout
    drops = lab.exec(host, ["cat", f"/sys/class/net/{dev}/statistics/tx_dropped"]).stdout
    return int(out) + int(drops)


def test_only_traffic_leaving_through_the_uplink_is_shaped(impaired_lab: Lab) -> None:
    """A tunnel's inner packets (routed to its TUN) must not be delayed a second time."""
    lab = impaired_lab
    lab.exec("slow", ["ip", "tuntap", "add", "dev", "tun9", "mode", "tun"])
    # No IPv6 on it: the kernel's own router solicitations would add to its counters.
    lab.exec("slow", ["sysctl", "-qw", "net.ipv6.conf.tun9.disable_ipv6=1"])
    lab.exec("slow", ["ip", "link", "set", "tun9", "up"])
    lab.exec("slow", ["ip", "route", "add", "100.64.0.0/24", "dev", "tun9"])
    shaped, tunnel = _tx_packets(lab, "slow", "rmsh0"), _tx_packets(lab, "slow", "tun9")
    lab.python("slow", ["udp-send", "100.64.0.2", "9", "inner", "--repeat", "5"])
    assert _tx_packets(lab, "slow", "tun9") - tunnel == 5
    # The kernel's own occasional packets (IPv6 neighbour probes) may cross rmsh0; our five not.
    assert _tx_packets(lab, "slow", "rmsh0") - shaped < 5
    lab.python("slow", ["udp-send", lab.address("r"), "9", "outer", "--repeat", "5"])
    assert _tx_packets(lab, "slow", "rmsh0") - shaped >= 5
