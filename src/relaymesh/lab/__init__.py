"""relaymesh.lab: real NAT topologies in network namespaces, and an in-memory twin.

See docs/lab.md. The public API: :class:`Topology` (data), :class:`Lab` (a running topology),
:class:`LabProcess` (a process spawned in a host), :class:`LabError`.
"""

from collections.abc import Callable

from relaymesh.lab.lab import Lab, LabProcess, NodeInfo, new_run_id
from relaymesh.lab.natcheck import NatBehaviour, NatObservation, assert_nat_kind, classify
from relaymesh.lab.netns import LabError
from relaymesh.lab.topology import NAT_KINDS, Impairment, NatKind, Topology, TopologyError

LabFactory = Callable[..., Lab]  # builds and starts a Lab from a Topology (the test fixtures)

__all__ = [
    "NAT_KINDS",
    "Impairment",
    "Lab",
    "LabError",
    "LabFactory",
    "LabProcess",
    "NatBehaviour",
    "NatKind",
    "NatObservation",
    "NodeInfo",
    "Topology",
    "TopologyError",
    "assert_nat_kind",
    "classify",
    "new_run_id",
]
