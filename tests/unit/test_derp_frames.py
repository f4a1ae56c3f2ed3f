"""DERP frames: round trips, random chunkings, limits, fuzzing, and the sans-IO handshake."""

from __future__ import annotations

import contextlib
import os
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaymesh.derp import frames as f
from relaymesh.keys import NodeKey, PrivateKey

FUZZ = int(os.environ.get("RELAYMESH_FUZZ_EXAMPLES", "300"))

node_keys = st.binary(min_size=32, max_size=32).map(NodeKey)
packets = st.binary(max_size=200)
ips = st.one_of(
    st.integers(0, 2**32 - 1).map(IPv4Address),
    st.integers(0, 2**128 - 1).map(IPv6Address).filter(lambda a: a.ipv4_mapped is None),
)
known_types = {int(t) for t in f.FrameType}
frames_st = st.one_of(
    st.builds(f.ServerKey, node_keys, st.binary(min_size=16, max_size=16)),
    st.builds(
        f.ClientInfo,
        node_keys,
        st.binary(min_size=24, max_size=24),
        st.binary(min_size=16, max_size=100),
    ),
    st.builds(
        f.ServerInfo, st.binary(min_size=24, max_size=24), st.binary(min_size=16, max_size=100)
    ),
    st.builds(f.SendPacket, node_keys, packets),
    st.builds(f.RecvPacket, node_keys, packets),
    st.just(f.KeepAlive()),
    st.builds(f.NotePreferred, st.booleans()),
    st.builds(f.PeerGone, node_keys, st.integers(0, 255)),
    st.builds(f.PeerPresent, node_keys),
    st.builds(f.PeerPresent, node_keys, st.tuples(ips, st.integers(0, 65535)), st.integers(0, 255)),
    st.just(f.WatchConns()),
    st.builds(f.Ping, st.binary(min_size=8, max_size=8)),
    st.builds(f.Pong, st.binary(min_size=8, max_size=8)),
    st.builds(f.Health, st.text(max_size=50)),
    st.builds(f.Restarting, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(f.ForwardPacket, node_keys, node_keys, packets),
    st.builds(f.UnknownFrame, st.integers(0, 255).filter(lambda t: t not in known_types), packets),
)


@given(frames_st)
def test_frame_round_trip(frame: f.Frame) -> None:
    assert f.FrameReader().frames(f.encode_frame(frame)) == [frame]


@given(st.lists(frames_st, max_size=12), st.data())
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_reader_handles_any_chunking(frames: list[f.Frame], data: st.DataObject) -> None:
    stream = b"".join(f.encode_frame(x) for x in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    reader = f.FrameReader()
    got: list[f.Frame] = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += reader.frames(stream[prev:cut])
        prev = cut
    assert got == frames
    assert reader.buffered == 0


def test_byte_at_a_time() -> None:
    key = NodeKey(b"k" * 32)
    stream = f.encode_send_packet(key, b"hello") + f.encode_frame(f.KeepAlive())
    reader = f.FrameReader()
    got: list[f.Frame] = []
    for i in range(len(stream)):
        got += reader.frames(stream[i : i + 1])
    assert got == [f.SendPacket(key, b"hello"), f.KeepAlive()]


def test_layout_of_send_and_recv_packet() -> None:
    key = NodeKey(bytes(range(32)))
    assert f.encode_send_packet(key, b"xy") == b"\x04\x00\x00\x00\x22" + bytes(range(32)) + b"xy"
    assert f.encode_recv_packet(key, b"") == b"\x05\x00\x00\x00\x20" + bytes(range(32))
    assert f.encode_frame(f.SendPacket(key, b"xy")) == f.encode_send_packet(key, b"xy")


def test_oversized_frame_is_refused_before_buffering_and_reader_stays_failed() -> None:
    reader = f.FrameReader(max_frame_len=100)
    with pytest.raises(f.FrameError):
        reader.frames(b"\x04" + (101).to_bytes(4, "big"))
    with pytest.raises(f.FrameError):
        reader.frames(f.encode_frame(f.KeepAlive()))


def test_default_limit_allows_the_largest_packet() -> None:
    src, dst = NodeKey(b"s" * 32), NodeKey(b"d" * 32)
    big = f.ForwardPacket(src, dst, b"\x00" * f.MAX_PACKET_SIZE)
    assert f.FrameReader().frames(f.encode_frame(big)) == [big]
    with pytest.raises(f.FrameError):
        f.encode_send_packet(dst, b"\x00" * (f.MAX_PACKET_SIZE + 1))


@pytest.mark.parametrize(
    ("ftype", "payload"),
    [
        (f.FrameType.KEEP_ALIVE, b"\x00"),
        (f.FrameType.NOTE_PREFERRED, b"\x02"),
        (f.FrameType.PEER_GONE, b"\x00" * 32),
        (f.FrameType.PEER_PRESENT, b"\x00" * 40),
        (f.FrameType.PING, b"\x00" * 7),
        (f.FrameType.SEND_PACKET, b"\x00" * 31),
        (f.FrameType.FORWARD_PACKET, b"\x00" * 63),
        (f.FrameType.HEALTH, b"\xff\xfe"),
        (f.FrameType.RESTARTING, b"\x00" * 9),
        (f.FrameType.SERVER_KEY, b"X" * 58),  # wrong magic
    ],
)
def test_bad_payloads_raise_frame_error(ftype: int, payload: bytes) -> None:
    with pytest.raises(f.FrameError):
        f.decode_frame(ftype, payload)


@given(st.binary(max_size=400))
@settings(max_examples=FUZZ)
def test_fuzz_reader_random_bytes(data: bytes) -> None:
    reader = f.FrameReader(max_frame_len=1000)
    with contextlib.suppress(f.FrameError):
        reader.frames(data)


@given(st.integers(0, 255), st.binary(max_size=200))
@settings(max_examples=FUZZ)
def test_fuzz_decode_frame(ftype: int, payload: bytes) -> None:
    with contextlib.suppress(f.FrameError):
        frame = f.decode_frame(ftype, payload)
        assert f.encode_frame(frame)[5:] == payload  # what decodes re-encodes identically


@given(st.lists(frames_st, min_size=1, max_size=5), st.data())
@settings(max_examples=FUZZ, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_reader_mutated_streams(frames: list[f.Frame], data: st.DataObject) -> None:
    stream = bytearray(b"".join(f.encode_frame(x) for x in frames))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(stream) - 1))
        stream[i] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(f.FrameError):
        f.FrameReader(max_frame_len=4096).frames(bytes(stream))


# ---- handshake ------------------------------------------------------------------------------


def _pair(
    mesh_server: str | None = None, mesh_client: str | None = None
) -> tuple[f.ServerHandshake, f.ClientHandshake, PrivateKey, PrivateKey]:
    server_priv, client_priv = PrivateKey.generate(), PrivateKey.generate()
    info = f.ServerInfoPayload(token_bucket_bytes_per_second=1000, token_bucket_bytes_burst=5000)
    server = f.ServerHandshake(server_priv, os.urandom(16), info, mesh_key=mesh_server)
    client = f.ClientHandshake(
        client_priv, expected_server_key=server_priv.node_public(), mesh_key=mesh_client
    )
    return server, client, server_priv, client_priv


def _one(data: bytes) -> f.Frame:
    got = f.FrameReader().frames(data)
    assert len(got) == 1
    return got[0]


def test_handshake_proves_both_keys() -> None:
    server, client, server_priv, client_priv = _pair()
    client_info = client.receive_server_key(_one(server.start()))
    server_info = server.receive(_one(client_info))
    info = client.receive_server_info(_one(server_info))
    assert server.done and client.done
    assert server.client_key == client_priv.node_public()
    assert client.server_key == server_priv.node_public()
    assert info.token_bucket_bytes_per_second == 1000 and info.token_bucket_bytes_burst == 5000
    assert server.client_info is not None and server.client_info.can_ack_pings
    assert not server.is_mesh_peer


def test_mesh_key_marks_mesh_peers_only_when_it_matches() -> None:
    server, client, _, _ = _pair(mesh_server="s3cret", mesh_client="s3cret")
    server.receive(_one(client.receive_server_key(_one(server.start()))))
    assert server.is_mesh_peer
    server, client, _, _ = _pair(mesh_server="s3cret", mesh_client="guess")
    server.receive(_one(client.receive_server_key(_one(server.start()))))
    assert not server.is_mesh_peer


def test_client_claiming_someone_elses_key_is_refused() -> None:
    server, client, _, _ = _pair()
    real = _one(client.receive_server_key(_one(server.start())))
    assert isinstance(real, f.ClientInfo)
    victim = PrivateKey.generate().node_public()
    forged = f.ClientInfo(victim, real.nonce, real.sealed)
    with pytest.raises(f.HandshakeError):
        server.receive(forged)
    assert server.client_key is None


def test_client_info_replayed_on_another_connection_is_refused() -> None:
    server, client, server_priv, _ = _pair()
    captured = _one(client.receive_server_key(_one(server.start())))
    other_conn = f.ServerHandshake(server_priv, os.urandom(16))
    with pytest.raises(f.HandshakeError, match="challenge"):
        other_conn.receive(captured)


def test_client_refuses_a_server_key_not_in_the_derp_map() -> None:
    _, client, _, _ = _pair()
    impostor = f.ServerHandshake(PrivateKey.generate(), os.urandom(16))
    with pytest.raises(f.HandshakeError):
        client.receive_server_key(_one(impostor.start()))


def test_client_refuses_server_info_not_sealed_by_the_server_key() -> None:
    server, client, _, client_priv = _pair()
    client.receive_server_key(_one(server.start()))
    # An impostor that knows the client's public key but not the server's private key.
    impostor = f.ServerHandshake(PrivateKey.generate(), os.urandom(16))
    ci = f.ClientHandshake(client_priv)
    fake_info = impostor.receive(_one(ci.receive_server_key(_one(impostor.start()))))
    with pytest.raises(f.HandshakeError):
        client.receive_server_info(_one(fake_info))


def test_handshake_out_of_order_frames_are_refused() -> None:
    server, client, _, _ = _pair()
    with pytest.raises(f.HandshakeError):
        server.receive(f.KeepAlive())
    with pytest.raises(f.HandshakeError):
        client.receive_server_info(f.ServerInfo(b"\x00" * 24, b"\x00" * 16))
    with pytest.raises(f.HandshakeError):
        client.receive_server_key(f.KeepAlive())


@given(st.binary(min_size=16, max_size=120), st.binary(min_size=24, max_size=24))
@settings(max_examples=FUZZ)
def test_fuzz_server_handshake_garbage_client_info(sealed: bytes, nonce: bytes) -> None:
    server = f.ServerHandshake(PrivateKey.generate(), b"\x01" * 16)
    with contextlib.suppress(f.FrameError):
        server.receive(f.ClientInfo(NodeKey(os.urandom(32)), nonce, sealed))
    assert server.client_key is None


@pytest.mark.parametrize(
    "plain",
    [b"not json", b"[1]", b'{"version": "1"}', b'{"version": 1, "challenge": "zz"}', b"[" * 5000],
)
def test_bad_client_info_json_is_a_handshake_error(plain: bytes) -> None:
    from nacl.public import Box
    from nacl.public import PrivateKey as NP
    from nacl.public import PublicKey as NPub

    server_priv, client_priv = PrivateKey.generate(), PrivateKey.generate()
    server = f.ServerHandshake(server_priv, b"\x01" * 16)
    box = Box(NP(client_priv.raw), NPub(server_priv.public_raw()))
    nonce = os.urandom(24)
    sealed = box.encrypt(plain, nonce).ciphertext
    with pytest.raises(f.HandshakeError):
        server.receive(f.ClientInfo(client_priv.node_public(), nonce, sealed))
