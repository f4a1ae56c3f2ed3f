"""Machine-key request authentication (NaCl box over method, path and time) and API keys."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import nacl.public
import pytest

from relaymesh.control.auth import (
    HEADER_AUTH,
    HEADER_MACHINE,
    ApiKeys,
    AuthError,
    MachineVerifier,
    auth_headers,
    load_or_create_private_key,
)
from relaymesh.keys import PrivateKey

NOW = 1_800_000_000.0
PATH = "/api/v1/map"


def make() -> tuple[PrivateKey, MachineVerifier]:
    return PrivateKey.generate(), MachineVerifier(PrivateKey.generate(), max_skew=120)


def verify(v: MachineVerifier, h: dict[str, str], method: str = "GET", path: str = PATH,
           now: float = NOW) -> object:
    return v.verify(h.get(HEADER_MACHINE), h.get(HEADER_AUTH), method, path, now)


def test_good_box_authenticates_the_machine() -> None:
    machine, v = make()
    h = auth_headers(machine, v.public, "GET", PATH, NOW)
    assert verify(v, h) == machine.machine_public()
    assert verify(v, h, now=NOW + 120) == machine.machine_public()  # edge of the window


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h, m, v: {**h, HEADER_MACHINE: PrivateKey.generate().machine_public().to_text()},
         "does not open"),
        (lambda h, m, v: auth_headers(m, PrivateKey.generate().machine_public(), "GET", PATH,
                                      NOW), "does not open"),
        (lambda h, m, v: auth_headers(m, v.public, "POST", PATH, NOW), "another request"),
        (lambda h, m, v: auth_headers(m, v.public, "GET", "/api/v1/update", NOW),
         "another request"),
        (lambda h, m, v: auth_headers(m, v.public, "GET", PATH, NOW - 121), "timestamp"),
        (lambda h, m, v: auth_headers(m, v.public, "GET", PATH, float("nan")), "timestamp"),
        (lambda h, m, v: {**h, HEADER_AUTH: "AAAA"}, "too short"),
        (lambda h, m, v: {**h, HEADER_AUTH: "A" * 5000}, "too long"),
        (lambda h, m, v: {**h, HEADER_MACHINE: "nodekey:" + "00" * 32}, "bad"),
        (lambda h, m, v: {HEADER_MACHINE: h[HEADER_MACHINE]}, "missing"),
    ],
)
def test_refusals(mutate: object, reason: str) -> None:
    machine, v = make()
    h = auth_headers(machine, v.public, "GET", PATH, NOW)
    bad = mutate(h, machine, v)  # type: ignore[operator]
    with pytest.raises(AuthError, match=reason):
        verify(v, bad)


def test_tampered_ciphertext_is_refused() -> None:
    machine, v = make()
    h = auth_headers(machine, v.public, "GET", PATH, NOW)
    raw = bytearray(base64.b64decode(h[HEADER_AUTH]))
    raw[-1] ^= 1
    with pytest.raises(AuthError, match="does not open"):
        verify(v, {**h, HEADER_AUTH: base64.b64encode(bytes(raw)).decode()})


def test_box_with_wrong_json_is_refused() -> None:
    machine, v = make()
    box = nacl.public.Box(nacl.public.PrivateKey(machine.raw), nacl.public.PublicKey(v.public.raw))
    sealed = bytes(box.encrypt(json.dumps({"when": NOW}).encode()))
    h = {HEADER_MACHINE: machine.machine_public().to_text(),
         HEADER_AUTH: base64.b64encode(sealed).decode()}
    with pytest.raises(AuthError, match="malformed"):
        verify(v, h)


def test_api_keys_are_hashed_and_persist(tmp_path: Path) -> None:
    path = tmp_path / "apikeys.json"
    keys = ApiKeys(path)
    k = keys.create(NOW)
    assert k.startswith("rmapi-") and k not in path.read_text()
    again = ApiKeys(path)
    assert again.check(k)
    assert not again.check(k + "x")
    assert not again.check("")


def test_server_key_created_once_0600(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    k1 = load_or_create_private_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_private_key(path).raw == k1.raw
