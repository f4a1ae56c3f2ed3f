"""DERP frame codec and handshake (sans-IO): what goes over the DERP TCP stream.

Every frame (all integers big-endian)::

    0   1   frame type (FrameType)
    1   4   payload length
    5   n   payload

Payloads (keys are 32-byte Curve25519 public keys; "packet" is an opaque disco or WireGuard packet
of at most MAX_PACKET_SIZE bytes):

================  ====  ============================================================================
frame             code  payload
================  ====  ============================================================================
server-key        0x01  MAGIC (10: "RMDERP🔑") + server key (32) + challenge (16, fresh per conn)
client-info       0x02  client node key (32) + nonce (24) + box(client priv -> server key, JSON)
server-info       0x03  nonce (24) + box(server priv -> client key, JSON)
send-packet       0x04  destination node key (32) + packet
recv-packet       0x05  source node key (32) + packet
keep-alive        0x06  empty
note-preferred    0x07  1 byte: 1 = this is the client's home DERP server, 0 = not
peer-gone         0x08  node key (32) + reason (1: 0 = disconnected, 1 = not here)
peer-present      0x09  node key (32) [+ ip:port (18, disco address encoding) + flags (1)]
watch-conns       0x0a  empty (mesh peers only: subscribe to peer-present/peer-gone)
ping              0x0b  8 opaque bytes, echoed in a pong
pong              0x0c  the 8 bytes of the ping
health            0x0d  UTF-8 problem text; empty = healthy again
restarting        0x0e  reconnect in (4, ms) + keep trying for (4, ms)
forward-packet    0x0f  source node key (32) + destination node key (32) + packet (mesh only)
================  ====  ============================================================================

Unknown frame types decode to :class:`UnknownFrame` so newer peers can add frames; a known frame
with a bad payload, or any frame longer than the reader's limit, raises :class:`FrameError` and the
connection should be closed.

Handshake: the server sends server-key with a fresh random challenge. The client answers with
client-info: JSON ``{"version", "challenge" (hex), "mesh_key", "can_ack_pings", "is_prober"}``
sealed with NaCl box from its node private key to the server key. Opening the box proves the client
holds the private half of the node key it claims (the challenge stops replay on another connection).
The server replies with server-info, JSON ``{"version", "token_bucket_bytes_per_second",
"token_bucket_bytes_burst"}`` boxed back, which proves to the client that the server holds the
server private key.
"""

from __future__ import annotations

import enum
import hmac
import json
import os
import struct
from dataclasses import dataclass
from typing import Any, TypeVar

from nacl.exceptions import CryptoError
from nacl.public import Box
from nacl.public import PrivateKey as NaclPrivateKey
from nacl.public import PublicKey as NaclPublicKey

from relaymesh.disco.codec import ADDR_LEN, AddrPort, DiscoError, decode_addr, encode_addr
from relaymesh.keys import KEY_LEN, NodeKey, PrivateKey

FRAME_HEADER_LEN = 5  # type (1) + length (4)
MAGIC = "RMDERP🔑".encode()  # 10 bytes, first thing a client sees: wrong server -> fail fast
assert len(MAGIC) == 10
CHALLENGE_LEN = 16  # fresh per connection; binds client-info to this connection
NONCE_LEN = 24  # NaCl box nonce
BOX_OVERHEAD = 16  # Poly1305 tag
PING_LEN = 8  # opaque ping/pong payload, as in the reference protocol
PROTOCOL_VERSION = 1
MAX_PACKET_SIZE = 64 * 1024  # largest packet a client may send through DERP
MAX_INFO_LEN = 16 * 1024  # client-info/server-info/health JSON or text
MAX_FRAME_LEN = MAX_PACKET_SIZE + 2 * KEY_LEN  # forward-packet is the largest frame

_HDR = struct.Struct(">BI")
_T = TypeVar("_T")
_U32U32 = struct.Struct(">II")


class FrameError(ValueError):
    """A malformed or oversized frame: close the connection and count it."""


class HandshakeError(FrameError):
    """The DERP handshake failed (bad magic, proof, challenge, version or order)."""


class FrameType(enum.IntEnum):
    SERVER_KEY = 0x01
    CLIENT_INFO = 0x02
    SERVER_INFO = 0x03
    SEND_PACKET = 0x04
    RECV_PACKET = 0x05
    KEEP_ALIVE = 0x06
    NOTE_PREFERRED = 0x07
    PEER_GONE = 0x08
    PEER_PRESENT = 0x09
    WATCH_CONNS = 0x0A
    PING = 0x0B
    PONG = 0x0C
    HEALTH = 0x0D
    RESTARTING = 0x0E
    FORWARD_PACKET = 0x0F


class PeerGoneReason(enum.IntEnum):
    DISCONNECTED = 0  # the peer was connected here and left
    NOT_HERE = 1  # a send-packet named a key that is not connected here


@dataclass(frozen=True, slots=True)
class ServerKey:
    key: NodeKey
    challenge: bytes


@dataclass(frozen=True, slots=True)
class ClientInfo:
    key: NodeKey
    nonce: bytes
    sealed: bytes  # box ciphertext of the client-info JSON


@dataclass(frozen=True, slots=True)
class ServerInfo:
    nonce: bytes
    sealed: bytes


@dataclass(frozen=True, slots=True)
class SendPacket:
    dst: NodeKey
    packet: bytes


@dataclass(frozen=True, slots=True)
class RecvPacket:
    src: NodeKey
    packet: bytes


@dataclass(frozen=True, slots=True)
class KeepAlive:
    pass


@dataclass(frozen=True, slots=True)
class NotePreferred:
    preferred: bool


@dataclass(frozen=True, slots=True)
class PeerGone:
    key: NodeKey
    reason: int  # PeerGoneReason; other values are kept for newer servers


@dataclass(frozen=True, slots=True)
class PeerPresent:
    key: NodeKey
    endpoint: AddrPort | None = None
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WatchConns:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    data: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    data: bytes


@dataclass(frozen=True, slots=True)
class Health:
    problem: str  # empty = healthy


@dataclass(frozen=True, slots=True)
class Restarting:
    reconnect_in_ms: int
    try_for_ms: int


@dataclass(frozen=True, slots=True)
class ForwardPacket:
    src: NodeKey
    dst: NodeKey
    packet: bytes


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    """A frame type this version does not know; skip it."""

    type: int
    payload: bytes


Frame = (
    ServerKey
    | ClientInfo
    | ServerInfo
    | SendPacket
    | RecvPacket
    | KeepAlive
    | NotePreferred
    | PeerGone
    | PeerPresent
    | WatchConns
    | Ping
    | Pong
    | Health
    | Restarting
    | ForwardPacket
    | UnknownFrame
)


def frame_header(ftype: int, length: int) -> bytes:
    return _HDR.pack(ftype, length)


def _check_packet(p: bytes) -> None:
    if len(p) > MAX_PACKET_SIZE:
        raise FrameError(f"packet of {len(p)} bytes exceeds {MAX_PACKET_SIZE}")


def encode_send_packet(dst: NodeKey, packet: bytes) -> bytes:
    """Hot path: one send-packet frame."""
    _check_packet(packet)
    return _HDR.pack(FrameType.SEND_PACKET, KEY_LEN + len(packet)) + dst.raw + packet


def encode_recv_packet(src: NodeKey, packet: bytes) -> bytes:
    """Hot path: one recv-packet frame."""
    _check_packet(packet)
    return _HDR.pack(FrameType.RECV_PACKET, KEY_LEN + len(packet)) + src.raw + packet


def _payload(frame: Frame) -> tuple[int, bytes]:
    match frame:
        case ServerKey(key, challenge):
            if len(challenge) != CHALLENGE_LEN:
                raise FrameError("challenge must be 16 bytes")
            return FrameType.SERVER_KEY, MAGIC + key.raw + challenge
        case ClientInfo(key, nonce, sealed):
            if len(nonce) != NONCE_LEN:
                raise FrameError("nonce must be 24 bytes")
            return FrameType.CLIENT_INFO, key.raw + nonce + sealed
        case ServerInfo(nonce, sealed):
            if len(nonce) != NONCE_LEN:
                raise FrameError("nonce must be 24 bytes")
            return FrameType.SERVER_INFO, nonce + sealed
        case SendPacket(dst, packet):
            _check_packet(packet)
            return FrameType.SEND_PACKET, dst.raw + packet
        case RecvPacket(src, packet):
            _check_packet(packet)
            return FrameType.RECV_PACKET, src.raw + packet
        case KeepAlive():
            return FrameType.KEEP_ALIVE, b""
        case NotePreferred(preferred):
            return FrameType.NOTE_PREFERRED, b"\x01" if preferred else b"\x00"
        case PeerGone(key, reason):
            if not 0 <= reason <= 255:
                raise FrameError("peer-gone reason must fit one byte")
            return FrameType.PEER_GONE, key.raw + bytes((reason,))
        case PeerPresent(key, endpoint, flags):
            if endpoint is None:
                if flags:
                    raise FrameError("peer-present flags need an endpoint")
                return FrameType.PEER_PRESENT, key.raw
            if not 0 <= flags <= 255:
                raise FrameError("peer-present flags must fit one byte")
            try:
                addr = encode_addr(endpoint)
            except DiscoError as e:
                raise FrameError(str(e)) from e
            return FrameType.PEER_PRESENT, key.raw + addr + bytes((flags,))
        case WatchConns():
            return FrameType.WATCH_CONNS, b""
        case Ping(data):
            if len(data) != PING_LEN:
                raise FrameError("ping data must be 8 bytes")
            return FrameType.PING, data
        case Pong(data):
            if len(data) != PING_LEN:
                raise FrameError("pong data must be 8 bytes")
            return FrameType.PONG, data
        case Health(problem):
            raw = problem.encode()
            if len(raw) > MAX_INFO_LEN:
                raise FrameError("health text too long")
            return FrameType.HEALTH, raw
        case Restarting(reconnect_in_ms, try_for_ms):
            if not (0 <= reconnect_in_ms < 1 << 32 and 0 <= try_for_ms < 1 << 32):
                raise FrameError("restarting times must fit 32 bits")
            return FrameType.RESTARTING, _U32U32.pack(reconnect_in_ms, try_for_ms)
        case ForwardPacket(src, dst, packet):
            _check_packet(packet)
            return FrameType.FORWARD_PACKET, src.raw + dst.raw + packet
        case UnknownFrame(ftype, payload):
            if not 0 <= ftype <= 255 or ftype in FrameType.__members__.values():
                raise FrameError("an unknown frame needs an unassigned type byte")
            return ftype, payload
    raise FrameError(f"not a DERP frame: {type(frame).__name__}")


def encode_frame(frame: Frame) -> bytes:
    """Header + payload for any frame; raises FrameError on out-of-range fields."""
    ftype, payload = _payload(frame)
    return _HDR.pack(ftype, len(payload)) + payload


def _exact(payload: bytes, n: int, name: str) -> None:
    if len(payload) != n:
        raise FrameError(f"{name} payload must be {n} bytes, got {len(payload)}")


def _at_least(payload: bytes, n: int, name: str) -> None:
    if len(payload) < n:
        raise FrameError(f"{name} payload must be at least {n} bytes, got {len(payload)}")


def decode_frame(ftype: int, payload: bytes) -> Frame:
    """Typed frame from its type byte and payload; raises FrameError on a bad payload."""
    if ftype == FrameType.SEND_PACKET or ftype == FrameType.RECV_PACKET:
        _at_least(payload, KEY_LEN, "packet")
        _check_packet(payload[KEY_LEN:])
        key = NodeKey(payload[:KEY_LEN])
        if ftype == FrameType.SEND_PACKET:
            return SendPacket(key, payload[KEY_LEN:])
        return RecvPacket(key, payload[KEY_LEN:])
    if ftype == FrameType.FORWARD_PACKET:
        _at_least(payload, 2 * KEY_LEN, "forward-packet")
        _check_packet(payload[2 * KEY_LEN :])
        return ForwardPacket(
            NodeKey(payload[:KEY_LEN]),
            NodeKey(payload[KEY_LEN : 2 * KEY_LEN]),
            payload[2 * KEY_LEN :],
        )
    if ftype == FrameType.SERVER_KEY:
        _exact(payload, len(MAGIC) + KEY_LEN + CHALLENGE_LEN, "server-key")
        if payload[: len(MAGIC)] != MAGIC:
            raise HandshakeError("bad DERP magic: not a relaymesh DERP server")
        off = len(MAGIC)
        return ServerKey(NodeKey(payload[off : off + KEY_LEN]), payload[off + KEY_LEN :])
    if ftype == FrameType.CLIENT_INFO:
        _at_least(payload, KEY_LEN + NONCE_LEN + BOX_OVERHEAD, "client-info")
        if len(payload) > KEY_LEN + NONCE_LEN + BOX_OVERHEAD + MAX_INFO_LEN:
            raise FrameError("client-info too long")
        return ClientInfo(
            NodeKey(payload[:KEY_LEN]),
            payload[KEY_LEN : KEY_LEN + NONCE_LEN],
            payload[KEY_LEN + NONCE_LEN :],
        )
    if ftype == FrameType.SERVER_INFO:
        _at_least(payload, NONCE_LEN + BOX_OVERHEAD, "server-info")
        if len(payload) > NONCE_LEN + BOX_OVERHEAD + MAX_INFO_LEN:
            raise FrameError("server-info too long")
        return ServerInfo(payload[:NONCE_LEN], payload[NONCE_LEN:])
    if ftype == FrameType.KEEP_ALIVE:
        _exact(payload, 0, "keep-alive")
        return KeepAlive()
    if ftype == FrameType.WATCH_CONNS:
        _exact(payload, 0, "watch-conns")
        return WatchConns()
    if ftype == FrameType.NOTE_PREFERRED:
        _exact(payload, 1, "note-preferred")
        if payload[0] > 1:
            raise FrameError("note-preferred must be 0 or 1")
        return NotePreferred(payload[0] == 1)
    if ftype == FrameType.PEER_GONE:
        _exact(payload, KEY_LEN + 1, "peer-gone")
        return PeerGone(NodeKey(payload[:KEY_LEN]), payload[KEY_LEN])
    if ftype == FrameType.PEER_PRESENT:
        if len(payload) == KEY_LEN:
            return PeerPresent(NodeKey(payload))
        _exact(payload, KEY_LEN + ADDR_LEN + 1, "peer-present")
        try:
            ep = decode_addr(payload[KEY_LEN : KEY_LEN + ADDR_LEN])
        except DiscoError as e:
            raise FrameError(str(e)) from e
        return PeerPresent(NodeKey(payload[:KEY_LEN]), ep, payload[-1])
    if ftype == FrameType.PING or ftype == FrameType.PONG:
        _exact(payload, PING_LEN, "ping/pong")
        return Ping(payload) if ftype == FrameType.PING else Pong(payload)
    if ftype == FrameType.HEALTH:
        if len(payload) > MAX_INFO_LEN:
            raise FrameError("health text too long")
        try:
            return Health(payload.decode())
        except UnicodeDecodeError as e:
            raise FrameError("health text is not UTF-8") from e
    if ftype == FrameType.RESTARTING:
        _exact(payload, 8, "restarting")
        return Restarting(*_U32U32.unpack(payload))
    return UnknownFrame(ftype, payload)


class FrameReader:
    """Incremental frame parser: feed TCP bytes in any chunking, take whole frames out.

    After a FrameError the stream is out of sync or the peer is misbehaving: the reader stays
    failed and every later call raises again, so a caller cannot carry on by mistake.
    """

    def __init__(self, max_frame_len: int = MAX_FRAME_LEN) -> None:
        self.max_frame_len = max_frame_len
        self._buf = bytearray()
        self._pos = 0
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._error is not None:
            raise FrameError(f"reader failed earlier: {self._error}")
        if self._pos and self._pos >= len(self._buf) // 2:
            del self._buf[: self._pos]  # compact lazily: amortised O(1) per byte
            self._pos = 0
        self._buf += data

    def next_frame(self) -> Frame | None:
        """The next whole frame, or None until more bytes arrive; raises FrameError."""
        if self._error is not None:
            raise FrameError(f"reader failed earlier: {self._error}")
        avail = len(self._buf) - self._pos
        if avail < FRAME_HEADER_LEN:
            return None
        ftype, length = _HDR.unpack_from(self._buf, self._pos)
        if length > self.max_frame_len:
            self._error = FrameError(f"frame of {length} bytes exceeds {self.max_frame_len}")
            raise self._error
        if avail < FRAME_HEADER_LEN + length:
            return None
        start = self._pos + FRAME_HEADER_LEN
        payload = bytes(self._buf[start : start + length])
        self._pos = start + length
        try:
            return decode_frame(ftype, payload)
        except FrameError as e:
            self._error = e
            raise
        except (ValueError, DiscoError) as e:  # defensive: a key or address constructor refused
            self._error = FrameError(str(e))
            raise self._error from e

    def frames(self, data: bytes | bytearray | memoryview = b"") -> list[Frame]:
        """Feed ``data`` and return every whole frame now available."""
        if data:
            self.feed(data)
        out: list[Frame] = []
        while (f := self.next_frame()) is not None:
            out.append(f)
        return out


# ---- handshake --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientInfoPayload:
    version: int = PROTOCOL_VERSION
    challenge: bytes = b""
    mesh_key: str | None = None  # shared secret of a server mesh; None for ordinary clients
    can_ack_pings: bool = True
    is_prober: bool = False

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": self.version,
                "challenge": self.challenge.hex(),
                "mesh_key": self.mesh_key,
                "can_ack_pings": self.can_ack_pings,
                "is_prober": self.is_prober,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ClientInfoPayload:
        d = _json_object(raw)
        try:
            challenge = bytes.fromhex(_get(d, "challenge", str))
        except ValueError as e:
            raise HandshakeError("client-info challenge is not hex") from e
        mesh = d.get("mesh_key")
        if mesh is not None and not isinstance(mesh, str):
            raise HandshakeError("client-info mesh_key must be a string or null")
        return cls(
            version=_get(d, "version", int),
            challenge=challenge,
            mesh_key=mesh,
            can_ack_pings=_get(d, "can_ack_pings", bool, False),
            is_prober=_get(d, "is_prober", bool, False),
        )


@dataclass(frozen=True, slots=True)
class ServerInfoPayload:
    version: int = PROTOCOL_VERSION
    token_bucket_bytes_per_second: int = 0  # 0 = unlimited
    token_bucket_bytes_burst: int = 0

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "version": self.version,
                "token_bucket_bytes_per_second": self.token_bucket_bytes_per_second,
                "token_bucket_bytes_burst": self.token_bucket_bytes_burst,
            }
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ServerInfoPayload:
        d = _json_object(raw)
        return cls(
            version=_get(d, "version", int),
            token_bucket_bytes_per_second=_get(d, "token_bucket_bytes_per_second", int, 0),
            token_bucket_bytes_burst=_get(d, "token_bucket_bytes_burst", int, 0),
        )


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        d = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise HandshakeError("handshake JSON does not parse") from e
    if not isinstance(d, dict):
        raise HandshakeError("handshake JSON must be an object")
    return d


def _get(d: dict[str, Any], name: str, kind: type[_T], default: _T | None = None) -> _T:
    v = d.get(name, default)
    if not isinstance(v, kind) or (isinstance(v, bool) and kind is int):
        raise HandshakeError(f"handshake field {name!r} missing or not {kind.__name__}")
    return v


def _box(private: PrivateKey, public: NodeKey) -> Box:
    try:
        return Box(NaclPrivateKey(private.raw), NaclPublicKey(public.raw))
    except CryptoError as e:  # low-order public key
        raise HandshakeError("unusable peer key") from e


class ServerHandshake:
    """Server side: ``start()`` -> send; ``receive(client-info frame)`` -> send; then ready.

    ``challenge`` must be fresh random bytes per connection (the shell passes os.urandom(16)).
    """

    def __init__(
        self,
        private: PrivateKey,
        challenge: bytes,
        info: ServerInfoPayload | None = None,
        mesh_key: str | None = None,
    ) -> None:
        if len(challenge) != CHALLENGE_LEN:
            raise ValueError("challenge must be 16 bytes")
        self._private = private
        self.server_key = private.node_public()
        self._challenge = challenge
        self._info = info or ServerInfoPayload()
        self._mesh_key = mesh_key
        self.client_key: NodeKey | None = None
        self.client_info: ClientInfoPayload | None = None
        self.is_mesh_peer = False

    @property
    def done(self) -> bool:
        return self.client_key is not None

    def start(self) -> bytes:
        return encode_frame(ServerKey(self.server_key, self._challenge))

    def receive(self, frame: Frame) -> bytes:
        """Verify the client's proof; returns the server-info frame. Raises HandshakeError."""
        if self.done:
            raise HandshakeError("handshake already complete")
        if not isinstance(frame, ClientInfo):
            raise HandshakeError(f"expected client-info, got {type(frame).__name__}")
        box = _box(self._private, frame.key)
        try:
            plain = box.decrypt(frame.sealed, frame.nonce)
        except CryptoError as e:
            raise HandshakeError("client-info does not open: no proof of the node key") from e
        info = ClientInfoPayload.from_json(plain)
        if info.version != PROTOCOL_VERSION:
            raise HandshakeError(f"unsupported DERP protocol version {info.version}")
        if not hmac.compare_digest(info.challenge, self._challenge):
            raise HandshakeError("client-info answers another connection's challenge")
        self.is_mesh_peer = (
            self._mesh_key is not None
            and info.mesh_key is not None
            and hmac.compare_digest(info.mesh_key.encode(), self._mesh_key.encode())
        )
        self.client_key = frame.key
        self.client_info = info
        nonce = os.urandom(NONCE_LEN)
        sealed = box.encrypt(self._info.to_json(), nonce).ciphertext
        return encode_frame(ServerInfo(nonce, sealed))


class ClientHandshake:
    """Client side: ``receive_server_key`` -> send; ``receive_server_info`` -> ready.

    ``expected_server_key`` (from the DERP map) pins the server; without it the first key wins.
    """

    def __init__(
        self,
        private: PrivateKey,
        expected_server_key: NodeKey | None = None,
        mesh_key: str | None = None,
        can_ack_pings: bool = True,
        is_prober: bool = False,
    ) -> None:
        self._private = private
        self.node_key = private.node_public()
        self._expected = expected_server_key
        self._mesh_key = mesh_key
        self._can_ack_pings = can_ack_pings
        self._is_prober = is_prober
        self.server_key: NodeKey | None = None
        self.server_info: ServerInfoPayload | None = None

    @property
    def done(self) -> bool:
        return self.server_info is not None

    def receive_server_key(self, frame: Frame) -> bytes:
        """The server's key and challenge -> the client-info frame to send."""
        if self.server_key is not None:
            raise HandshakeError("server-key received twice")
        if not isinstance(frame, ServerKey):
            raise HandshakeError(f"expected server-key, got {type(frame).__name__}")
        if self._expected is not None and frame.key != self._expected:
            raise HandshakeError("DERP server key does not match the DERP map")
        info = ClientInfoPayload(
            challenge=frame.challenge,
            mesh_key=self._mesh_key,
            can_ack_pings=self._can_ack_pings,
            is_prober=self._is_prober,
        )
        nonce = os.urandom(NONCE_LEN)
        sealed = _box(self._private, frame.key).encrypt(info.to_json(), nonce).ciphertext
        self.server_key = frame.key
        return encode_frame(ClientInfo(self.node_key, nonce, sealed))

    def receive_server_info(self, frame: Frame) -> ServerInfoPayload:
        """Verify the server's reply; raises HandshakeError."""
        if self.server_key is None or self.done:
            raise HandshakeError("server-info out of order")
        if not isinstance(frame, ServerInfo):
            raise HandshakeError(f"expected server-info, got {type(frame).__name__}")
        try:
            plain = _box(self._private, self.server_key).decrypt(frame.sealed, frame.nonce)
        except CryptoError as e:
            raise HandshakeError("server-info does not open: server lacks its key") from e
        info = ServerInfoPayload.from_json(plain)
        if info.version != PROTOCOL_VERSION:
            raise HandshakeError(f"unsupported DERP protocol version {info.version}")
        self.server_info = info
        return info
