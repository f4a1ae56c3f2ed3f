"""The one path vocabulary used by status, ping, metrics labels, logs and lab asserts."""

from __future__ import annotations

import enum


class Path(enum.StrEnum):
    """How packets to a peer travel; ordered by preference (direct is best)."""

    DIRECT = "direct"
    PEER_RELAY = "peer_relay"
    DERP = "derp"
    NONE = "none"

    @property
    def rank(self) -> int:
        """Lower is preferred: direct > peer relay > DERP > none."""
        return _RANK[self]


_RANK = {Path.DIRECT: 0, Path.PEER_RELAY: 1, Path.DERP: 2, Path.NONE: 3}
