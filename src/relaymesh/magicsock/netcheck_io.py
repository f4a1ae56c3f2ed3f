"""netcheck shell: runs the sans-IO :class:`~relaymesh.magicsock.netcheck.Netcheck` on asyncio.

Three ways to give it a UDP socket:

- :func:`netcheck` with no socket: a fresh IPv4 socket (and an IPv6 one when the DERP map has IPv6
  STUN addresses and the host can bind one), closed afterwards. What ``relaymesh netcheck`` needs:
  the NAT's behaviour and the region latencies.
- :func:`netcheck` with ``sock=``: a UDP socket the caller dedicates to the check while it runs
  (it is used through a duplicate descriptor, never closed; its blocking mode is restored). The
  global address then is that socket's own NAT mapping.
- :class:`NetcheckRunner` with a ``send`` callable: for a socket whose receive side belongs to
  someone else (the daemon's one magicsock socket, read by the datapath thread). The owner hands
  every STUN datagram (``relaymesh.stun.is_stun``) to :meth:`NetcheckRunner.feed` on the event
  loop; the answers then show the mapping peers will actually see, the endpoint to report.

HTTP latency probes (``GET /derp/probe``, for regions without a STUN answer) go through
``relaymesh.derp.client.probe_latency`` unless another prober is injected (tests). Host names in
the DERP map are resolved here, once, with a timeout; the core only sees addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from relaymesh.derp.client import DerpError, node_url, probe_latency
from relaymesh.magicsock.netcheck import (
    Addr,
    HttpProbe,
    Netcheck,
    NetcheckConfig,
    Report,
    StunProbe,
    derp_hosts,
    ip_literal,
)

log = logging.getLogger(__name__)

HttpProber = Callable[[Mapping[str, Any], float], Awaitable[float]]
Send = Callable[[bytes, Addr], None]

DNS_TIMEOUT_S = 2.0  # a DERP host name that does not resolve this fast is treated as unreachable
HTTP_PROBE_COUNT = 3  # best of three round trips on one connection (probe_latency's default)
# Belt and braces on top of the core's own deadlines: the shell never waits longer than the
# phases can last plus this much (a stuck prober or clock mistake cannot hang the daemon's API).
SLACK_S = 1.0
V4_MAPPED = "::ffff:"  # IPv4-mapped IPv6 prefix on a dual-stack socket (RFC 4291 2.5.5.2)


async def default_http_prober(node: Mapping[str, Any], timeout: float) -> float:
    """RTT in seconds of ``GET /derp/probe`` on the node's DERP port (TCP/TLS setup excluded)."""
    return await probe_latency(node_url(node), count=HTTP_PROBE_COUNT, timeout=timeout)


def _normalize(src: Any) -> Addr:
    host = str(src[0])
    if host.startswith(V4_MAPPED) and "." in host:
        host = host[len(V4_MAPPED):]
    return host.split("%", 1)[0], int(src[1])


async def resolve_hosts(derp_map: Mapping[str, Any], timeout: float = DNS_TIMEOUT_S
                        ) -> dict[str, list[str]]:
    """Addresses of every DERP node host that is not an IP literal (failures: left out)."""
    names = [h for h in derp_hosts(derp_map) if ip_literal(h) is None]
    loop = asyncio.get_running_loop()

    async def one(host: str) -> tuple[str, list[str]]:
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, None, type=socket.SOCK_DGRAM), timeout)
        except (OSError, TimeoutError) as e:
            log.info("netcheck: cannot resolve DERP host %s: %s", host, e)
            return host, []
        return host, list(dict.fromkeys(str(i[4][0]) for i in infos))

    return dict(await asyncio.gather(*(one(h) for h in names)))


class NetcheckRunner:
    """Drives one :class:`Netcheck` on the running loop over a caller's ``send`` callable.

    Everything happens on the event loop thread: :meth:`feed` must be called there (from a
    datapath thread use ``loop.call_soon_threadsafe(runner.feed, data, src)``).
    """

    def __init__(
        self,
        derp_map: Mapping[str, Any],
        send: Send | Mapping[int, Send],
        *,
        config: NetcheckConfig | None = None,
        http_prober: HttpProber = default_http_prober,
        resolved: Mapping[str, list[str]] | None = None,
    ) -> None:
        """``send``: one callable for every address family, or {4: send_v4, 6: send_v6} where
        only some families can be sent (the core then plans no probe it cannot send)."""
        self._senders: dict[int, Send] = (dict(send) if isinstance(send, Mapping)
                                          else {4: send, 6: send})
        self.config = config or NetcheckConfig()
        self.core = Netcheck(derp_map, config=self.config, resolved=resolved,
                             families=tuple(self._senders))
        self._http_prober = http_prober
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop = asyncio.get_running_loop()

    def feed(self, data: bytes, src: Any) -> bool:
        """A datagram that arrived on the socket; True if it answered one of our requests."""
        used = self.core.receive(bytes(data), _normalize(src), self._loop.time())
        if used:
            self._wake.set()
        return used

    def _dispatch(self, actions: list[StunProbe | HttpProbe]) -> None:
        for a in actions:
            if isinstance(a, StunProbe):
                fam = 6 if ":" in a.dest[0] else 4
                try:
                    self._senders[fam](a.packet, a.dest)
                except OSError as e:  # unreachable network etc.: the target just stays silent
                    self.core.counters["send_error"] += 1
                    log.debug("netcheck: STUN to %s failed: %s", a.dest, e)
            else:
                task = asyncio.create_task(self._http(a))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _http(self, probe: HttpProbe) -> None:
        rtt: float | None
        try:
            rtt = await self._http_prober(probe.node, self.config.http_timeout_s)
        except (DerpError, OSError, TimeoutError, ValueError) as e:
            log.debug("netcheck: HTTP probe of %s failed: %s", probe.node_name, e)
            rtt = None
        except Exception as e:  # an injected prober's bug must not leave the probe pending
            log.warning("netcheck: HTTP prober raised for %s: %r", probe.node_name, e)
            rtt = None
        self.core.http_result(probe, rtt, self._loop.time())
        self._wake.set()

    async def run(self) -> Report:
        """Run the check to the end and return the report."""
        loop = self._loop
        limit = (self.config.stun_timeout_s + self.config.http_timeout_s + SLACK_S)
        try:
            async with asyncio.timeout(limit):
                self._dispatch(self.core.start(loop.time()))
                while not self.core.done():
                    deadline = self.core.next_deadline()
                    if deadline is not None:
                        delay = deadline - loop.time()
                        if delay > 0:
                            self._wake.clear()
                            with contextlib.suppress(TimeoutError):
                                await asyncio.wait_for(self._wake.wait(), delay)
                    self._dispatch(self.core.poll(loop.time()))
        except TimeoutError:
            self.core.counters["shell_timeout"] += 1
            log.warning("netcheck: gave up after %.1f s", limit)
        finally:
            for t in list(self._tasks):
                t.cancel()
        return self.core.report()


class _Proto(asyncio.DatagramProtocol):
    def __init__(self, deliver: Callable[[bytes, Any], bool]) -> None:
        self.deliver = deliver
        self.errors = 0

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.deliver(data, addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: that target is silent
        self.errors += 1


async def netcheck(
    derp_map: Mapping[str, Any],
    *,
    sock: socket.socket | None = None,
    bind_v4: Addr = ("0.0.0.0", 0),
    bind_v6: Addr | None = ("::", 0),
    config: NetcheckConfig | None = None,
    http_prober: HttpProber = default_http_prober,
) -> Report:
    """One netcheck over ``sock`` (dedicated to it while this runs) or fresh sockets.

    Fresh sockets: IPv4 bound to ``bind_v4``, and IPv6 (v6-only) bound to ``bind_v6`` when that is
    not None and the DERP map has an IPv6 STUN address; a host without IPv6 just reports none.
    """
    loop = asyncio.get_running_loop()
    resolved = await resolve_hosts(derp_map)
    transports: list[asyncio.DatagramTransport] = []
    runner: NetcheckRunner | None = None

    def deliver(data: bytes, addr: Any) -> bool:
        return runner.feed(data, addr) if runner is not None else False

    async def open_endpoint(**kw: Any) -> asyncio.DatagramTransport:
        tr, _ = await loop.create_datagram_endpoint(lambda: _Proto(deliver), **kw)
        transports.append(tr)
        return tr

    def sender(tr: asyncio.DatagramTransport, v6_socket: bool) -> Send:
        def send(data: bytes, addr: Addr) -> None:
            host = addr[0]
            if v6_socket and ":" not in host:
                host = V4_MAPPED + host
            tr.sendto(data, (host, addr[1]))
        return send

    was_blocking: bool | None = None
    try:
        senders: dict[int, Send] = {}
        if sock is not None:
            was_blocking = sock.getblocking()
            dup = sock.dup()
            tr = await open_endpoint(sock=dup)
            if sock.family == socket.AF_INET6:
                senders[6] = sender(tr, True)
                v6only = sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)
                if not v6only:
                    senders[4] = sender(tr, True)
            else:
                senders[4] = sender(tr, False)
        else:
            tr = await open_endpoint(local_addr=bind_v4, family=socket.AF_INET)
            senders[4] = sender(tr, False)
            if bind_v6 is not None and _has_v6_target(derp_map, resolved):
                try:
                    s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
                    s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s6.bind(bind_v6)
                except OSError as e:
                    log.info("netcheck: no IPv6 socket: %s", e)
                else:
                    senders[6] = sender(await open_endpoint(sock=s6), True)
        runner = NetcheckRunner(derp_map, senders, config=config, http_prober=http_prober,
                                resolved=resolved)
        return await runner.run()
    finally:
        for tr in transports:
            tr.close()
        if sock is not None and was_blocking is not None:
            await asyncio.sleep(0)  # let the transport's close run before restoring the mode
            sock.setblocking(was_blocking)


def _has_v6_target(derp_map: Mapping[str, Any], resolved: Mapping[str, list[str]]) -> bool:
    for host in derp_hosts(derp_map):
        lit = ip_literal(host)
        for ip in ([lit] if lit else resolved.get(host, [])):
            if ipaddress.ip_address(ip).version == 6:
                return True
    return False


def main(argv: list[str] | None = None) -> int:
    """``python -m relaymesh.magicsock.netcheck_io DERP_MAP.json [--json] [--bind IP:PORT]``:
    one check without the daemon (lab hosts, debugging); exit 0 when any region answered."""
    import argparse
    import json
    from pathlib import Path

    p = argparse.ArgumentParser(prog="python -m relaymesh.magicsock.netcheck_io")
    p.add_argument("derp_map", type=Path, help="DERP map JSON file ({\"regions\": [...]})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--bind", default="0.0.0.0:0", help="local IPv4 IP:PORT of the fresh socket")
    a = p.parse_args(argv)
    derp_map = json.loads(a.derp_map.read_text())
    host, _, port = str(a.bind).rpartition(":")
    report = asyncio.run(netcheck(derp_map, bind_v4=(host or "0.0.0.0", int(port))))
    print(report.to_json() if a.json else report.summary())
    return 0 if report.region_latency_ms else 1


if __name__ == "__main__":
    raise SystemExit(main())
