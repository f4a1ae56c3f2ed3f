"""The peer relay: relay-path header and the sans-IO session core (the UDP shell is elsewhere)."""

from relaymesh.relay.header import (
    CONTROL_BIT,
    HEADER_LEN,
    PROTO_DISCO,
    PROTO_WIREGUARD,
    HeaderError,
    RelayHeader,
    decode_header,
    encode_header,
    is_control,
    looks_like_relay,
)
from relaymesh.relay.session import (
    Addr,
    BindClient,
    BindError,
    Drop,
    RelayLimits,
    RelayMetrics,
    RelayServer,
    SessionStats,
    State,
)

__all__ = [
    "CONTROL_BIT",
    "HEADER_LEN",
    "PROTO_DISCO",
    "PROTO_WIREGUARD",
    "Addr",
    "BindClient",
    "BindError",
    "Drop",
    "HeaderError",
    "RelayHeader",
    "RelayLimits",
    "RelayMetrics",
    "RelayServer",
    "SessionStats",
    "State",
    "decode_header",
    "encode_header",
    "is_control",
    "looks_like_relay",
]
