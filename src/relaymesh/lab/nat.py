"""nftables rulesets for the LAN router namespaces, one per NAT kind (RFC 4787 behaviour).

| kind        | mapping (IPv4)                        | filtering (IPv4 and IPv6)               |
|-------------|---------------------------------------|-----------------------------------------|
| none        | routed, public LAN addresses          | none                                    |
| firewall    | routed, public LAN addresses          | stateful: inbound only for inside flows |
| easy        | masquerade: port-preserving, EIM      | address-and-port dependent (conntrack)  |
| hard        | masquerade fully-random: EDM          | address-and-port dependent              |
| one2one     | SNAT+DNAT to a fixed public address   | none                                    |
| udp-blocked | as easy                               | as easy, and all UDP leaving is dropped |

IPv6 is never translated (it is routed like a home router does) but gets the kind's filtering.

Why the input-chain drop: a packet from outside to the router's own public address that matches
no mapping would create an inbound conntrack entry; if it arrives just before the inside host's
first outbound packet of a simultaneous open, that entry takes the tuple and masquerade has to pick
another port, which breaks hole punching. Dropping it in input means the entry is never confirmed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relaymesh.lab.topology import NatKind

WAN_IF = "wan"
# Kinds whose router drops inbound flows that were not started from inside.
FILTERING_KINDS: frozenset[str] = frozenset({"firewall", "easy", "hard", "udp-blocked"})
MASQUERADE_KINDS: frozenset[str] = frozenset({"easy", "hard", "udp-blocked"})
ROUTED_KINDS: frozenset[str] = frozenset({"none", "firewall"})


@dataclass
class NatConfig:
    kind: NatKind
    # LAN address -> fixed public address (one2one only).
    one2one: dict[str, str] = field(default_factory=dict)
    # (LAN address, UDP port) opened to the inside (the "one firewall exception").
    forwards: list[tuple[str, int]] = field(default_factory=list)


def ruleset(cfg: NatConfig) -> str:
    """The ``nft -f`` text for one LAN router; empty for ``none`` without forwards."""
    pre: list[str] = []
    post: list[str] = []
    fwd: list[str] = []
    inp: list[str] = []
    kind = cfg.kind
    w = f'iifname "{WAN_IF}"'
    o = f'oifname "{WAN_IF}"'

    if kind in MASQUERADE_KINDS:
        # Linux masquerade keeps the source port when the resulting tuple is unique, which gives
        # the same public port for every destination (EIM); fully-random picks a new random port
        # for every new flow, i.e. per destination (EDM, the pfSense / carrier NAT behaviour).
        post.append(f"{o} masquerade" + (" fully-random" if kind == "hard" else ""))
        for addr, port in cfg.forwards:
            pre.append(f"{w} udp dport {port} dnat ip to {addr}:{port}")
    elif kind == "one2one":
        for priv, pub in cfg.one2one.items():
            pre.append(f"{w} ip daddr {pub} dnat ip to {priv}")
            post.append(f"{o} ip saddr {priv} snat ip to {pub}")

    if kind == "udp-blocked":
        fwd.append(f"{o} meta l4proto udp drop")
    if kind in FILTERING_KINDS:
        fwd.append(f"{w} ct state established,related accept")
        for addr, port in cfg.forwards:
            fwd.append(f"{w} ip daddr {addr} udp dport {port} accept")
        fwd.append(f"{w} drop")
        inp.append(f"{w} ct state established,related accept")
        # Neighbour discovery is IPv6's ARP: dropping it would cut the router off its uplink.
        inp.append(f"{w} icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert }} accept")
        inp.append(f"{w} drop")

    out: list[str] = []
    if pre or post:
        out.append("table ip rmnat {")
        out.append("  chain prerouting_nat {")
        out.append("    type nat hook prerouting priority dstnat; policy accept;")
        out += [f"    {r}" for r in pre]
        out.append("  }")
        out.append("  chain postrouting_nat {")
        out.append("    type nat hook postrouting priority srcnat; policy accept;")
        out += [f"    {r}" for r in post]
        out.append("  }")
        out.append("}")
    if fwd or inp:
        out.append("table inet rmfilter {")
        out.append("  chain forward_filter {")
        out.append("    type filter hook forward priority filter; policy accept;")
        out += [f"    {r}" for r in fwd]
        out.append("  }")
        out.append("  chain input_filter {")
        out.append("    type filter hook input priority filter; policy accept;")
        out += [f"    {r}" for r in inp]
        out.append("  }")
        out.append("}")
    return "\n".join(out) + ("\n" if out else "")
