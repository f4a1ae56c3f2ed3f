"""relaymesh: a self-hosted mesh VPN on WireGuard whose headline feature is peer relays."""

__version__ = "0.1.0"
