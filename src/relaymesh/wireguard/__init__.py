"""relaymesh.wireguard: sans-IO WireGuard (whitepaper protocol) and its I/O shell.

The core (this package minus tun/config/datapath/netconf) never does I/O: see :mod:`.device`.
"""

from .device import Device, Endpoint, Keypair, Peer, Received, Timers, Transmit

__all__ = ["Device", "Endpoint", "Keypair", "Peer", "Received", "Timers", "Transmit"]
