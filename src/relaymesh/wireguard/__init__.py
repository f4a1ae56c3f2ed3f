"""relaymesh.wireguard: sans-IO WireGuard (whitepaper protocol) and its I/O shell."""
