"""Default topologies, as functions and as the equivalent TOML files beside this module.

- ``pair``: two hosts ``a`` and ``b`` directly on the internet.
- ``nat_pair(kind_a, kind_b)``: ``a`` behind a ``kind_a`` NAT (network ``lan_a``), ``b`` behind a
  ``kind_b`` NAT (``lan_b``), and ``srv`` on the internet for the control server / DERP.
- ``relay``: ``a`` and ``b`` behind hard NATs (direct paths impossible), the peer relay ``r`` and
  ``srv`` on the internet.
"""

from __future__ import annotations

from pathlib import Path

from relaymesh.lab.topology import Topology, TopologyError

TOML_DIR = Path(__file__).parent


def pair() -> Topology:
    topo = Topology("pair")
    topo.add_host("a")
    topo.add_host("b")
    return topo


def nat_pair(kind_a: str = "easy", kind_b: str = "easy") -> Topology:
    topo = Topology("nat_pair")
    topo.add_network("lan_a", nat=kind_a)
    topo.add_network("lan_b", nat=kind_b)
    topo.add_host("a", network="lan_a")
    topo.add_host("b", network="lan_b")
    topo.add_host("srv")
    return topo


def relay() -> Topology:
    topo = Topology("relay")
    topo.add_network("lan_a", nat="hard")
    topo.add_network("lan_b", nat="hard")
    topo.add_host("a", network="lan_a")
    topo.add_host("b", network="lan_b")
    topo.add_host("r")
    topo.add_host("srv")
    return topo


BUILTIN = {"pair": pair, "nat_pair": nat_pair, "relay": relay}


def load(spec: str) -> Topology:
    """A TOML file path, a built-in name, or ``nat_pair:KIND_A,KIND_B``."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        return Topology.from_toml(path)
    name, _, args = spec.partition(":")
    if name == "nat_pair" and args:
        kinds = args.split(",")
        if len(kinds) != 2:
            raise TopologyError("nat_pair takes two NAT kinds: nat_pair:KIND_A,KIND_B")
        return nat_pair(kinds[0], kinds[1])
    if name in BUILTIN and not args:
        return BUILTIN[name]()
    raise TopologyError(
        f"no topology file or built-in named {spec!r} (built-ins: {', '.join(BUILTIN)})")
