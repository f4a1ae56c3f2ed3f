"""A wg-quick style configuration parser for ``relaymesh wg up``.

The accepted format is the subset of wg-quick(8) that a userspace interface can honour::

    [Interface]
    PrivateKey = <base64, 32 bytes>
    ListenPort = 51820                 # optional; 0 or absent = any free port
    Address = 10.0.0.1/24, fd00::1/64  # optional; comma lists, may repeat
    MTU = 1420                         # optional

    [Peer]                             # any number
    PublicKey = <base64>
    PresharedKey = <base64>            # optional
    AllowedIPs = 10.0.0.2/32, fd00::2/128
    Endpoint = host:port | [v6]:port   # optional
    PersistentKeepalive = 25 | off     # optional

Keys and section names are case-insensitive (as in wg(8)); ``#`` starts a comment. Anything else
(unknown keys such as hooks, which relaymesh does not run, bad keys, bad CIDRs) raises
:class:`ConfigError` carrying the 1-based line number and a reason, so the CLI can print one line.
Key material never appears in a repr or an error message.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from relaymesh.keys import PrivateKey

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

KEY_LEN = 32  # Curve25519 keys and WireGuard preshared keys are 32 bytes
BASE64_KEY_LEN = 44  # len(base64(32 bytes)) with its one '=' pad, as wg(8) prints them
MIN_MTU_V4 = 576  # RFC 791: every IPv4 host must accept 576-byte datagrams
MIN_MTU_V6 = 1280  # RFC 8200 section 5: IPv6 minimum link MTU
MAX_MTU = 65535  # largest IPv4/IPv6 (non-jumbo) packet
MAX_KEEPALIVE = 65535  # wg(8): PersistentKeepalive is a 16-bit number of seconds


class ConfigError(ValueError):
    """A configuration problem at a given line (0 when it concerns the whole file)."""

    def __init__(self, line: int, reason: str, source: str = "<config>") -> None:
        super().__init__(f"{source}:{line}: {reason}")
        self.line = line
        self.reason = reason
        self.source = source


@dataclass(frozen=True, slots=True)
class PeerConfig:
    """One ``[Peer]`` section. ``endpoint`` is (host, port); host may still be a DNS name."""

    public_key: bytes
    allowed_ips: tuple[IPNetwork, ...] = ()
    preshared_key: bytes | None = field(default=None, repr=False)
    endpoint: tuple[str, int] | None = None
    persistent_keepalive: int | None = None
    line: int = 0  # where the section starts, for later error messages

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()


@dataclass(frozen=True, slots=True)
class InterfaceConfig:
    """The ``[Interface]`` section."""

    private_key: PrivateKey
    listen_port: int | None = None
    addresses: tuple[IPInterface, ...] = ()
    mtu: int | None = None


@dataclass(frozen=True, slots=True)
class WgConfig:
    interface: InterfaceConfig
    peers: tuple[PeerConfig, ...]


def load_config(path: str | Path) -> WgConfig:
    """Read and parse a file; an unreadable file is a ConfigError at line 0."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(0, f"cannot read: {reason}", str(p)) from None
    return parse_config(text, source=str(p))


def parse_config(text: str, *, source: str = "<config>") -> WgConfig:
    """Parse wg-quick text; see the module docstring for the accepted keys."""
    return _Parser(source).parse(text)


def parse_key(value: str) -> bytes:
    """A base64 32-byte key exactly as wg(8) writes it; ValueError otherwise (without the value)."""
    v = value.strip()
    if len(v) != BASE64_KEY_LEN:
        raise ValueError(f"key must be {BASE64_KEY_LEN} base64 characters, got {len(v)}")
    try:
        raw = base64.b64decode(v, validate=True)
    except binascii.Error:
        raise ValueError("key is not valid base64") from None
    if len(raw) != KEY_LEN:
        raise ValueError(f"key must decode to {KEY_LEN} bytes")
    return raw


def parse_endpoint(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port``; a bare IPv6 address without brackets is ambiguous."""
    v = value.strip()
    if v.startswith("["):
        close = v.find("]")
        if close < 0 or v[close + 1 : close + 2] != ":":
            raise ValueError("IPv6 endpoint must look like [addr]:port")
        host, port_s = v[1:close], v[close + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address in endpoint: {host!r}") from None
    else:
        host, sep, port_s = v.rpartition(":")
        if not sep or not host:
            raise ValueError("endpoint must be host:port or [v6]:port")
        if ":" in host:
            raise ValueError("IPv6 endpoint needs brackets: [addr]:port")
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ValueError(f"bad endpoint port: {port_s!r}")
    return host, int(port_s)


class _Parser:
    _INTERFACE_KEYS = frozenset({"privatekey", "listenport", "address", "mtu"})
    _PEER_KEYS = frozenset(
        {"publickey", "presharedkey", "allowedips", "endpoint", "persistentkeepalive"}
    )
    _LIST_KEYS = frozenset({"address", "allowedips"})  # may repeat; values accumulate

    def __init__(self, source: str) -> None:
        self.source = source
        self.section: str | None = None
        self.iface: dict[str, tuple[int, str]] = {}
        self.iface_lists: dict[str, list[tuple[int, str]]] = {}
        self.iface_line = 0
        self.peers: list[tuple[int, dict[str, tuple[int, str]], dict[str, list[tuple[int, str]]]]]
        self.peers = []

    def err(self, line: int, reason: str) -> ConfigError:
        return ConfigError(line, reason, self.source)

    def parse(self, text: str) -> WgConfig:
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("["):
                self._section(lineno, line)
                continue
            key, sep, value = line.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or not key:
                raise self.err(lineno, "expected 'Key = Value' or a [Section] header")
            self._assign(lineno, key, value)
        return self._build()

    def _section(self, lineno: int, line: str) -> None:
        if not line.endswith("]"):
            raise self.err(lineno, f"malformed section header {line!r}")
        name = line[1:-1].strip().lower()
        if name == "interface":
            if self.iface_line:
                first = self.iface_line
                raise self.err(lineno, f"second [Interface] section (first at line {first})")
            self.iface_line = lineno
        elif name == "peer":
            self.peers.append((lineno, {}, {}))
        else:
            raise self.err(lineno, f"unknown section [{line[1:-1].strip()}]")
        self.section = name

    def _assign(self, lineno: int, key: str, value: str) -> None:
        k = key.lower()
        if self.section is None:
            raise self.err(lineno, f"key {key!r} outside of any section")
        if self.section == "interface":
            allowed, scalars, lists = self._INTERFACE_KEYS, self.iface, self.iface_lists
        else:
            allowed, (_, scalars, lists) = self._PEER_KEYS, self.peers[-1]
        if k not in allowed:
            raise self.err(lineno, f"unknown key {key!r} in [{self.section.capitalize()}]")
        if not value:
            raise self.err(lineno, f"empty value for {key}")
        if k in self._LIST_KEYS:
            lists.setdefault(k, []).append((lineno, value))
        elif k in scalars:
            raise self.err(lineno, f"duplicate key {key!r} (first at line {scalars[k][0]})")
        else:
            scalars[k] = (lineno, value)

    def _build(self) -> WgConfig:
        if not self.iface_line:
            raise self.err(0, "missing [Interface] section")
        if "privatekey" not in self.iface:
            raise self.err(self.iface_line, "[Interface] has no PrivateKey")
        ln, v = self.iface["privatekey"]
        private_key = PrivateKey(self._key(ln, v, "PrivateKey"))
        listen_port = None
        if "listenport" in self.iface:
            ln, v = self.iface["listenport"]
            listen_port = self._int(ln, v, "ListenPort", 0, 65535)
        addresses: list[IPInterface] = []
        for ln, v in self.iface_lists.get("address", []):
            for item in self._items(ln, v):
                try:
                    addresses.append(ipaddress.ip_interface(item))
                except ValueError:
                    raise self.err(ln, f"bad Address {item!r} (want IP or IP/prefix)") from None
        mtu = None
        if "mtu" in self.iface:
            ln, v = self.iface["mtu"]
            minimum = MIN_MTU_V6 if any(a.version == 6 for a in addresses) else MIN_MTU_V4
            mtu = self._int(ln, v, "MTU", minimum, MAX_MTU)
        peers: list[PeerConfig] = []
        seen: dict[bytes, int] = {}
        own_public = private_key.public_raw()
        for start, scalars, lists in self.peers:
            peers.append(self._peer(start, scalars, lists))
            pk = peers[-1].public_key
            if pk in seen:
                raise self.err(start, f"duplicate peer PublicKey (first at line {seen[pk]})")
            if pk == own_public:
                raise self.err(start, "peer PublicKey is this interface's own public key")
            seen[pk] = start
        iface = InterfaceConfig(private_key, listen_port, tuple(addresses), mtu)
        return WgConfig(iface, tuple(peers))

    def _peer(
        self,
        start: int,
        scalars: dict[str, tuple[int, str]],
        lists: dict[str, list[tuple[int, str]]],
    ) -> PeerConfig:
        if "publickey" not in scalars:
            raise self.err(start, "[Peer] has no PublicKey")
        public_key = self._key(*scalars["publickey"], "PublicKey")
        psk = None
        if "presharedkey" in scalars:
            psk = self._key(*scalars["presharedkey"], "PresharedKey")
        allowed: list[IPNetwork] = []
        for ln, v in lists.get("allowedips", []):
            for item in self._items(ln, v):
                try:
                    # wg(8) accepts host bits and masks them off; so do we
                    allowed.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise self.err(ln, f"bad AllowedIPs entry {item!r} (want CIDR)") from None
        endpoint = None
        if "endpoint" in scalars:
            ln, v = scalars["endpoint"]
            try:
                endpoint = parse_endpoint(v)
            except ValueError as e:
                raise self.err(ln, f"bad Endpoint: {e}") from None
        keepalive = None
        if "persistentkeepalive" in scalars:
            ln, v = scalars["persistentkeepalive"]
            if v.lower() != "off":
                keepalive = self._int(ln, v, "PersistentKeepalive", 0, MAX_KEEPALIVE) or None
        return PeerConfig(public_key, tuple(allowed), psk, endpoint, keepalive, start)

    def _items(self, lineno: int, value: str) -> list[str]:
        items = [s.strip() for s in value.split(",")]
        if any(not s for s in items):
            raise self.err(lineno, "empty entry in comma-separated list")
        return items

    def _key(self, lineno: int, value: str, name: str) -> bytes:
        try:
            return parse_key(value)
        except ValueError as e:
            raise self.err(lineno, f"bad {name}: {e}") from None

    def _int(self, lineno: int, value: str, name: str, lo: int, hi: int) -> int:
        if not value.isdigit():
            raise self.err(lineno, f"{name} must be a number, got {value!r}")
        n = int(value)
        if not lo <= n <= hi:
            raise self.err(lineno, f"{name} {n} out of range {lo}..{hi}")
        return n
