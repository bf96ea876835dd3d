"""Signed base64 cloudpickle payloads: round trips, refusals, and nothing unpickled early."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import threading
from pathlib import Path
from typing import Any

import msgspec
import pybase64
import pytest
from blake3 import blake3

from flash_actors import PayloadSignatureError, SerializationError
from flash_actors.messages import FunctionRequest
from flash_actors.serialization import (
    SIGNATURE_VERSION,
    RequestSigner,
    decode_request,
    decode_result,
    decode_value,
    derive_key,
    encode_result,
    encode_value,
    endpoint_key,
    sign_request,
    verify_request,
)

KEY = endpoint_key("serialization-tests")
TEMPLATE = FunctionRequest(function_name="f", function_code="def f(x):\n    return x\n")


class Tripwire:
    """Unpickling it creates a file: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def sign(*args: Any, **kwargs: Any) -> FunctionRequest:
    return RequestSigner(KEY, TEMPLATE).sign(args, kwargs)


def test_request_round_trip_keeps_values_and_wire_shape() -> None:
    big = bytes(range(256)) * 4096
    req = sign(1, "two", big, flag=True, data={"a": [1.5]})
    assert all(isinstance(a, str) for a in req.args)  # Flash's shape: base64 strings
    assert pybase64.b64decode(req.args[0], validate=True)  # plain base64 cloudpickle
    wire = msgspec.json.decode(msgspec.json.encode(req), type=FunctionRequest)
    decoded = decode_request(wire, KEY)
    assert decoded.args == [1, "two", big]
    assert decoded.kwargs == {"flag": True, "data": {"a": [1.5]}}


def test_args_are_plain_flash_payloads() -> None:
    req = sign({"k": 1})
    assert decode_value(req.args[0]) == {"k": 1}
    assert decode_value(encode_value([1, 2])) == [1, 2]


def test_unsigned_request_is_refused_before_unpickling(tmp_path: Path) -> None:
    target = tmp_path / "unpickled"
    req = msgspec.structs.replace(sign(Tripwire(target)), signature=None)
    with pytest.raises(
        PayloadSignatureError, match=r"^refusing unsigned request for 'f'"
    ):
        decode_request(req, KEY)
    assert not target.exists()


def test_tampered_argument_is_refused_before_unpickling(tmp_path: Path) -> None:
    target = tmp_path / "unpickled"
    honest = sign(1)
    evil = sign(Tripwire(target))
    forged = msgspec.structs.replace(honest, args=evil.args)
    with pytest.raises(PayloadSignatureError, match=r"signature does not match"):
        decode_request(forged, KEY)
    assert not target.exists()
    assert decode_request(evil, KEY).args == [
        None
    ]  # signed: it is unpickled (and runs)
    assert target.exists()


def test_tampered_code_wrong_key_and_moved_kwargs_are_refused() -> None:
    req = sign(1, name="x")
    changed_code = msgspec.structs.replace(req, function_code="import os\n")
    with pytest.raises(PayloadSignatureError):
        decode_request(changed_code, KEY)
    with pytest.raises(PayloadSignatureError):
        decode_request(req, endpoint_key("another-endpoint"))
    renamed = msgspec.structs.replace(req, kwargs={"other": req.kwargs["name"]})
    with pytest.raises(PayloadSignatureError):
        decode_request(renamed, KEY)
    moved = msgspec.structs.replace(
        req, args=[], kwargs={**req.kwargs, "x": req.args[0]}
    )
    with pytest.raises(PayloadSignatureError):
        decode_request(moved, KEY)


def test_invalid_base64_is_a_serialization_error() -> None:
    req = msgspec.structs.replace(sign(1), args=["not base64!!"])
    with pytest.raises(SerializationError, match=r"argument 0 is not valid base64"):
        decode_request(req, KEY)


def test_unpicklable_argument_names_it() -> None:
    signer = RequestSigner(KEY, TEMPLATE)
    with pytest.raises(
        SerializationError, match=r"cannot serialize argument 'lock' \(lock\)"
    ):
        signer.sign((threading.Lock(),), {}, arg_names=("lock",))


def test_result_round_trip_and_refusal(tmp_path: Path) -> None:
    text, signature = encode_result({"ok": 1}, KEY)
    assert decode_result(text, signature, KEY) == {"ok": 1}
    target = tmp_path / "unpickled"
    evil, _ = encode_result(Tripwire(target), KEY)
    with pytest.raises(PayloadSignatureError):
        decode_result(evil, signature, KEY)
    with pytest.raises(PayloadSignatureError):
        decode_result(text, None, KEY)
    assert not target.exists()


def test_class_request_signs_constructor_and_instance() -> None:
    template = FunctionRequest(
        execution_type="class", class_name="C", class_code="class C:\n    pass\n"
    )
    signer = RequestSigner(KEY, template)
    req = signer.sign(
        (1,),
        {},
        constructor_args=(2,),
        constructor_kwargs={"k": 3},
        instance_id="abc",
        method_name="run",
    )
    decoded = decode_request(req, KEY)
    assert (decoded.args, decoded.constructor_args, decoded.constructor_kwargs) == (
        [1],
        [2],
        {"k": 3},
    )
    for change in (
        {"instance_id": "other"},
        {"method_name": "__init__"},
        {"constructor_args": req.args},
    ):
        with pytest.raises(PayloadSignatureError):
            decode_request(msgspec.structs.replace(req, **change), KEY)


def test_large_payloads_are_signed_by_chunk_digests_and_still_refused_when_changed() -> (
    None
):
    big = bytes(range(256)) * (5 * 4096)  # 5 MiB: hashed in 1 MiB chunks, in parallel
    req = sign(big, tail=b"x")
    assert decode_request(req, KEY).args == [big]
    raw = bytearray(pybase64.b64decode(req.args[0], validate=True))
    raw[3 * 1024 * 1024 + 17] ^= 1  # one bit in the fourth chunk
    forged = msgspec.structs.replace(
        req, args=[pybase64.b64encode(bytes(raw)).decode()]
    )
    with pytest.raises(PayloadSignatureError, match=r"signature does not match"):
        decode_request(forged, KEY)
    text, signature = encode_result(big, KEY)
    assert decode_result(text, signature, KEY) == big


def pseudo_random(size: int) -> bytes:
    """``size`` bytes that do not repeat within a block (so a changed block shows)."""
    return b"".join(
        hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(size // 32 + 1)
    )[:size]


@pytest.mark.parametrize("size", [1024, 1024 * 1024, 7 * 1024 * 1024])
def test_round_trips_of_1kb_1mb_and_7mb(size: int) -> None:
    blob = pseudo_random(size)
    req = sign(blob, named=blob[: size // 2])
    assert req.signature is not None
    assert req.signature.startswith(f"v{SIGNATURE_VERSION}:")
    wire = msgspec.json.decode(msgspec.json.encode(req), type=FunctionRequest)
    decoded = decode_request(wire, KEY)
    assert decoded.args == [blob]
    assert decoded.kwargs == {"named": blob[: size // 2]}
    text, signature = encode_result(blob, KEY)
    assert decode_result(text, signature, KEY) == blob


@pytest.mark.parametrize("size", [1024, 7 * 1024 * 1024])
def test_a_flipped_bit_anywhere_is_refused(size: int, tmp_path: Path) -> None:
    req = sign(pseudo_random(size))
    raw = bytearray(pybase64.b64decode(req.args[0], validate=True))
    for position in (0, len(raw) // 2, len(raw) - 1):
        raw[position] ^= 0x10
        forged = msgspec.structs.replace(req, args=[pybase64.b64encode_as_string(raw)])
        with pytest.raises(PayloadSignatureError, match=r"signature does not match"):
            decode_request(forged, KEY)
        raw[position] ^= 0x10
    text, signature = encode_result(pseudo_random(size), KEY)
    result = bytearray(pybase64.b64decode(text))
    result[len(result) // 2] ^= 1
    with pytest.raises(PayloadSignatureError, match=r"does not match"):
        decode_result(pybase64.b64encode_as_string(result), signature, KEY)


def old_scheme_signature(data: bytes) -> str:
    """What a flash-actors before scheme v2 sent: HMAC-SHA256 in hex, no version tag."""
    return hmac.new(KEY, data, hashlib.sha256).hexdigest()


def test_a_request_signed_by_the_old_scheme_is_refused_naming_both_versions(
    tmp_path: Path,
) -> None:
    target = tmp_path / "unpickled"
    req = sign(Tripwire(target))
    old = msgspec.structs.replace(req, signature=old_scheme_signature(b"anything"))
    expected = (
        r"^refusing request for 'f': it is signed with signature scheme v1 "
        r"\(HMAC-SHA256\) by an older flash-actors, and this one speaks only v2 "
        r"\(keyed BLAKE3\); run the same flash-actors version on the caller and the "
        r"workers$"
    )
    with pytest.raises(PayloadSignatureError, match=expected):
        decode_request(old, KEY)
    with pytest.raises(PayloadSignatureError, match=expected):
        verify_request(old, KEY)
    assert not target.exists()


def test_a_result_signed_by_the_old_scheme_is_refused_naming_the_version(
    tmp_path: Path,
) -> None:
    target = tmp_path / "unpickled"
    text = encode_value(Tripwire(target))
    raw = pybase64.b64decode(text)
    old = old_scheme_signature(b"R" + len(raw).to_bytes(8, "big") + raw)
    with pytest.raises(
        PayloadSignatureError,
        match=r"^refusing a result: it is signed with signature scheme v1 \(HMAC-SHA256\)",
    ):
        decode_result(text, old, KEY)
    assert not target.exists()


@pytest.mark.parametrize(
    ("signature", "expected"),
    [
        ("v3:" + "ab" * 32, r"signed with signature scheme v3, newer than this"),
        (
            "v2:" + "ab" * 31,
            r"its signature is not one of ours \(expected signature scheme v2",
        ),
        ("v2:" + "é" * 64, r"its signature is not one of ours"),
        ("sha256=" + "ab" * 32, r"its signature is not one of ours"),
        ("v" + "9" * 5000 + ":" + "ab" * 32, r"its signature is not one of ours"),
    ],
)
def test_other_versions_and_malformed_signatures_are_refused_clearly(
    signature: str, expected: str
) -> None:
    req = msgspec.structs.replace(sign(1), signature=signature)
    with pytest.raises(PayloadSignatureError, match=expected):
        decode_request(req, KEY)
    text, _ = encode_result(1, KEY)
    with pytest.raises(PayloadSignatureError, match=expected):
        decode_result(text, signature, KEY)


def test_the_version_is_signed_not_only_stated() -> None:
    """A v2 tag in front of a MAC computed without the version does not pass."""
    req = sign(1)
    assert req.signature is not None
    digest = req.signature.removeprefix("v2:")
    raw = pybase64.b64decode(req.args[0])
    untagged = blake3(len(raw).to_bytes(8, "big") + raw, key=KEY).hexdigest()
    assert untagged != digest
    for forged in ("v2:" + untagged, "v2:" + "0" * 64):
        with pytest.raises(PayloadSignatureError, match=r"signature does not match"):
            decode_request(msgspec.structs.replace(req, signature=forged), KEY)


def test_sign_request_signs_with_the_current_scheme() -> None:
    req = msgspec.structs.replace(sign(1, k="x"), signature=None)
    signed = sign_request(req, KEY)
    assert signed.signature == sign(1, k="x").signature
    assert decode_request(signed, KEY).kwargs == {"k": "x"}


def test_keys_are_derived_with_blake3_and_must_be_32_bytes() -> None:
    secret = bytes(range(32))
    key = derive_key(secret, "ep")
    assert len(key) == 32
    assert key != derive_key(secret, "ep2")
    assert key != derive_key(secret + b"\x00", "ep")
    context = "flash-actors 2026-12-02 endpoint MAC key (signature scheme v2)"
    material = len(secret).to_bytes(8, "big") + secret + b"ep"
    assert key == blake3(material, derive_key_context=context).digest()
    with pytest.raises(SerializationError, match=r"^a signing key is 32 bytes"):
        RequestSigner(b"short", TEMPLATE)
    with pytest.raises(SerializationError, match=r"^a signing key is 32 bytes"):
        encode_result(1, b"k" * 31)


def _encode_in_child(queue: Any) -> None:
    text, signature = encode_result(bytes(3 * 1024 * 1024), KEY)
    queue.put(decode_result(text, signature, KEY) == bytes(3 * 1024 * 1024))


@pytest.mark.timeout(60)
def test_a_forked_child_encodes_large_payloads_after_its_parent_did() -> None:
    """The helper thread does not survive fork: the child must start its own, not hang."""
    encode_result(bytes(3 * 1024 * 1024), KEY)  # the parent's helper thread now exists
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_encode_in_child, args=(queue,), daemon=True)
    child.start()
    try:
        assert queue.get(timeout=20) is True
    finally:
        child.join(timeout=10)
        if child.is_alive():  # it hung: stop it, the assertion above has failed
            child.kill()
            child.join()
    assert child.exitcode == 0


def test_invalid_base64_names_which_argument() -> None:
    req = sign(1, 2, k=3)
    second = msgspec.structs.replace(req, args=[req.args[0], "!!"])
    with pytest.raises(SerializationError, match=r"^argument 1 is not valid base64"):
        decode_request(second, KEY)
    keyword = msgspec.structs.replace(req, kwargs={"k": 7})
    with pytest.raises(SerializationError, match=r"^argument 'k' is of type int"):
        decode_request(keyword, KEY)
    constructor = msgspec.structs.replace(req, constructor_args=["??"])
    with pytest.raises(
        SerializationError, match=r"^constructor argument 0 is not valid base64"
    ):
        decode_request(constructor, KEY)
