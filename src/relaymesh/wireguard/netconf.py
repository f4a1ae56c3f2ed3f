"""Interface configuration over netlink (pyroute2): addresses, MTU, link state, routes.

:class:`NetConf` remembers what it added so that :meth:`NetConf.close` removes exactly that and
nothing else (an address or route that already existed is left alone). Closing the TUN fd would
remove the interface and its addresses anyway; explicit removal keeps this honest when the interface
outlives us (e.g. a persistent TUN) and makes failures visible in the log.

A default route (``0.0.0.0/0``, ``::/0``) in AllowedIPs is not routed: without wg-quick's fwmark
policy routing it would swallow the tunnel's own UDP traffic. It is skipped with a warning.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger(__name__)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class NetConfError(RuntimeError):
    """A netlink operation failed; the message names the operation, never key material."""


class NetConf:
    """Configures one interface (by name) in the current network namespace."""

    def __init__(self, ifname: str) -> None:
        self.ifname = ifname
        self._ipr = IPRoute()
        try:
            found = self._ipr.link_lookup(ifname=ifname)
        except NetlinkError as e:
            self._ipr.close()
            raise NetConfError(f"lookup of {ifname}: {e}") from None
        if not found:
            self._ipr.close()
            raise NetConfError(f"no interface named {ifname}")
        self.index: int = found[0]
        self._addresses: list[IPInterface] = []
        self._routes: list[IPNetwork] = []
        self._was_up = False

    def disable_ipv6_autoconf(self) -> None:
        """No IPv6 link-local address (addr_gen_mode 1 = none), as the kernel's wireguard does: a
        layer-3 tunnel has no use for one, and it would only send router solicitations that the
        core drops as unroutable. Best effort: IPv6 may be off entirely."""
        path = f"/proc/sys/net/ipv6/conf/{self.ifname}/addr_gen_mode"
        try:
            with open(path, "w") as f:
                f.write("1")
        except OSError as e:
            log.debug("cannot set %s: %s", path, e)

    def set_mtu(self, mtu: int) -> None:
        self._do(f"set MTU {mtu}", self._ipr.link, "set", index=self.index, mtu=mtu)

    def up(self) -> None:
        self._do("set link up", self._ipr.link, "set", index=self.index, state="up")
        self._was_up = True

    def add_address(self, address: IPInterface) -> None:
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        extra = {} if address.version == 4 else {"flags": 0}
        try:
            self._ipr.addr(
                "add",
                index=self.index,
                address=str(address.ip),
                prefixlen=address.network.prefixlen,
                family=family,
                **extra,
            )
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                log.info("address %s already on %s", address, self.ifname)
                return
            raise NetConfError(f"add address {address} to {self.ifname}: {e}") from None
        self._addresses.append(address)

    def add_route(self, network: IPNetwork) -> bool:
        """Route ``network`` into the interface; False when skipped (default route, exists)."""
        if network.prefixlen == 0:
            log.warning("not routing %s: full-tunnel routing is not supported", network)
            return False
        family = socket.AF_INET if network.version == 4 else socket.AF_INET6
        try:
            self._ipr.route("add", dst=str(network), oif=self.index, family=family)
        except NetlinkError as e:
            if e.code == errno.EEXIST:
                log.info("route %s already exists; not adding", network)
                return False
            raise NetConfError(f"add route {network} via {self.ifname}: {e}") from None
        self._routes.append(network)
        return True

    def apply(
        self, *, mtu: int, addresses: Iterable[IPInterface], routes: Iterable[IPNetwork]
    ) -> None:
        """The `wg up` sequence: MTU, addresses, link up, then routes (they need the link up)."""
        self.disable_ipv6_autoconf()
        self.set_mtu(mtu)
        for a in addresses:
            self.add_address(a)
        self.up()
        for n in routes:
            self.add_route(n)

    def close(self) -> None:
        """Remove the routes and addresses we added (newest first), then close the socket."""
        for n in reversed(self._routes):
            family = socket.AF_INET if n.version == 4 else socket.AF_INET6
            self._quiet(f"delete route {n}", self._ipr.route, "del", dst=str(n),
                        oif=self.index, family=family)
        self._routes.clear()
        for a in reversed(self._addresses):
            family = socket.AF_INET if a.version == 4 else socket.AF_INET6
            self._quiet(f"delete address {a}", self._ipr.addr, "del", index=self.index,
                        address=str(a.ip), prefixlen=a.network.prefixlen, family=family)
        self._addresses.clear()
        if self._was_up:
            self._quiet("set link down", self._ipr.link, "set", index=self.index, state="down")
            self._was_up = False
        self._ipr.close()

    @property
    def routes(self) -> list[IPNetwork]:
        return list(self._routes)

    @property
    def addresses(self) -> list[IPInterface]:
        return list(self._addresses)

    def _do(self, what: str, fn: object, *args: object, **kwargs: object) -> None:
        try:
            fn(*args, **kwargs)  # type: ignore[operator]
        except NetlinkError as e:
            raise NetConfError(f"{what} on {self.ifname}: {e}") from None

    def _quiet(self, what: str, fn: object, *args: object, **kwargs: object) -> None:
        """Cleanup: the interface may already be gone (ENODEV); log, never raise."""
        try:
            fn(*args, **kwargs)  # type: ignore[operator]
        except NetlinkError as e:
            if e.code not in (errno.ENODEV, errno.ESRCH, errno.EADDRNOTAVAIL, errno.ENOENT):
                log.warning("cleanup: %s on %s failed: %s", what, self.ifname, e)

    def __enter__(self) -> NetConf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
