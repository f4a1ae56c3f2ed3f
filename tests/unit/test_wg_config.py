"""wg-quick config parsing: the accepted forms, and one ConfigError (line + reason) per mistake."""

from __future__ import annotations

import base64
import ipaddress
import os
from pathlib import Path

import pytest

from relaymesh.keys import PrivateKey
from relaymesh.wireguard.config import ConfigError, load_config, parse_config, parse_endpoint

PRIV = PrivateKey.generate()
PRIV_B64 = PRIV.to_base64()
PEER_PUB = PrivateKey.generate().node_public().to_base64()
PEER2_PUB = PrivateKey.generate().node_public().to_base64()
PSK = base64.b64encode(os.urandom(32)).decode()


def good(extra_iface: str = "", extra_peer: str = "") -> str:
    return f"""\
# a comment line
[Interface]
PrivateKey = {PRIV_B64}
ListenPort = 51820
Address = 10.9.0.1/24, fd00:9::1/64
MTU = 1400{extra_iface}

[Peer]  # trailing comment
PublicKey = {PEER_PUB}
PresharedKey = {PSK}
AllowedIPs = 10.9.0.2/32, fd00:9::2/128
AllowedIPs = 192.168.77.0/24
Endpoint = 127.0.0.1:51821
PersistentKeepalive = 25{extra_peer}

[peer]
publickey = {PEER2_PUB}
endpoint = [::1]:51822
persistentkeepalive = off
"""


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_config(text, source="t.conf")
    return ei.value


def test_full_config_parses_every_field() -> None:
    cfg = parse_config(good())
    i = cfg.interface
    assert i.private_key.raw == PRIV.raw
    assert i.listen_port == 51820
    assert i.addresses == (
        ipaddress.ip_interface("10.9.0.1/24"),
        ipaddress.ip_interface("fd00:9::1/64"),
    )
    assert i.mtu == 1400
    p1, p2 = cfg.peers
    assert p1.public_key == base64.b64decode(PEER_PUB)
    assert p1.preshared_key == base64.b64decode(PSK)
    assert [str(n) for n in p1.allowed_ips] == ["10.9.0.2/32", "fd00:9::2/128", "192.168.77.0/24"]
    assert p1.endpoint == ("127.0.0.1", 51821)
    assert p1.persistent_keepalive == 25
    assert p2.endpoint == ("::1", 51822)
    assert p2.persistent_keepalive is None
    assert p2.allowed_ips == ()


def test_minimal_config_defaults() -> None:
    cfg = parse_config(f"[Interface]\nPrivateKey={PRIV_B64}\n")
    assert cfg.interface.listen_port is None
    assert cfg.interface.mtu is None
    assert cfg.interface.addresses == ()
    assert cfg.peers == ()


def test_allowed_ips_host_bits_are_masked_like_wg() -> None:
    cfg = parse_config(good(extra_peer="\nAllowedIPs = 10.1.2.3/8"))
    assert ipaddress.ip_network("10.0.0.0/8") in cfg.peers[0].allowed_ips


def test_private_and_preshared_keys_not_in_repr() -> None:
    cfg = parse_config(good())
    text = repr(cfg)
    assert PRIV_B64 not in text and PRIV.raw.hex() not in text
    assert PSK not in text and repr(base64.b64decode(PSK)) not in text


def test_error_message_format_has_source_and_line() -> None:
    e = error_of(good(extra_iface="\nDNS = 1.1.1.1"))
    assert e.line == 7
    assert str(e) == "t.conf:7: unknown key 'DNS' in [Interface]"


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        (good(extra_iface="\nPostUp = rm -rf /"), 7, "unknown key 'PostUp'"),
        (good(extra_peer="\nFoo = 1"), 15, "unknown key 'Foo' in [Peer]"),
        ("[Interface]\nPrivateKey = abc\n", 2, "bad PrivateKey"),
        (f"[Interface]\nPrivateKey = {PRIV_B64[:-2]}!=\n", 2, "bad PrivateKey: key is not valid"),
        (good().replace(f"PublicKey = {PEER_PUB}", "PublicKey = xyz"), 9, "bad PublicKey"),
        (good().replace(f"PresharedKey = {PSK}", "PresharedKey = " + "A" * 43), 10, "bad Pres"),
        (good(extra_peer="\nAllowedIPs = 10.0.0.0/33"), 15, "bad AllowedIPs entry '10.0.0.0/33'"),
        (good(extra_peer="\nAllowedIPs = 10.0.0.0/8,,"), 15, "empty entry"),
        (good(extra_peer="\nAllowedIPs = fd00::/129"), 15, "bad AllowedIPs entry"),
        (good(extra_iface="\nAddress = 10.0.0.300/24"), 7, "bad Address '10.0.0.300/24'"),
        (good().replace("127.0.0.1:51821", "127.0.0.1"), 13, "bad Endpoint"),
        (good().replace("127.0.0.1:51821", "127.0.0.1:99999"), 13, "bad endpoint port"),
        (good().replace("[::1]:51822", "::1:51822"), 18, "needs brackets"),
        (good().replace("[::1]:51822", "[zz::1]:5"), 18, "bad IPv6 address"),
        (good().replace("ListenPort = 51820", "ListenPort = 70000"), 4, "ListenPort 70000 out of"),
        (good().replace("ListenPort = 51820", "ListenPort = x"), 4, "must be a number"),
        (good().replace("MTU = 1400", "MTU = 1000"), 6, "MTU 1000 out of range 1280"),
        (good().replace("PersistentKeepalive = 25", "PersistentKeepalive = -1"), 14, "must be a"),
        (good(extra_iface="\nMTU = 1300"), 7, "duplicate key 'MTU' (first at line 6)"),
        (good(extra_iface="\nthis is not a key"), 7, "expected 'Key = Value'"),
        (good(extra_iface="\nMTU ="), 7, "empty value for MTU"),
        (good().replace("[peer]", "[Peers]"), 16, "unknown section [Peers]"),
        (good().replace("[peer]", "[Peer"), 16, "malformed section header"),
        ("PrivateKey = x\n", 1, "outside of any section"),
        (good() + "[Interface]\n", 20, "second [Interface] section"),
        (f"[Peer]\nPublicKey = {PEER_PUB}\n", 0, "missing [Interface]"),
        ("\n[Interface]\nListenPort = 1\n", 2, "[Interface] has no PrivateKey"),
        (good() + "[Peer]\nAllowedIPs = 10.0.0.0/8\n", 20, "[Peer] has no PublicKey"),
        (good() + f"[Peer]\nPublicKey = {PEER_PUB}\n", 20, "duplicate peer PublicKey"),
        (good() + f"[Peer]\nPublicKey = {PRIV.node_public().to_base64()}\n", 20, "own public key"),
    ],
)
def test_each_mistake_is_a_config_error_with_line(text: str, line: int, needle: str) -> None:
    e = error_of(text)
    assert e.line == line, str(e)
    assert needle in e.reason, str(e)
    assert str(e).startswith(f"t.conf:{line}: ")


def test_error_never_echoes_key_material() -> None:
    bad = PRIV_B64[:-4] + "####"  # '#' starts a comment, so the value is cut: still a bad key
    e = error_of(f"[Interface]\nPrivateKey = {bad}\n")
    assert PRIV_B64[:20] not in str(e)


def test_load_config_missing_file_is_line_zero(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(tmp_path / "nope.conf")
    assert ei.value.line == 0
    assert "cannot read" in ei.value.reason


def test_load_config_reads_file(tmp_path: Path) -> None:
    p = tmp_path / "wg0.conf"
    p.write_text(good())
    assert len(load_config(p).peers) == 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.2.3.4:5", ("1.2.3.4", 5)), ("[fd00::1]:51820", ("fd00::1", 51820)),
     ("example.test:7", ("example.test", 7))],
)
def test_parse_endpoint_forms(text: str, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text) == expected
