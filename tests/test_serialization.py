"""Signed base64 cloudpickle payloads: round trips, refusals, and nothing unpickled early."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import msgspec
import pybase64
import pytest

from flash_actors import PayloadSignatureError, SerializationError
from flash_actors.messages import FunctionRequest
from flash_actors.serialization import (
    RequestSigner,
    decode_request,
    decode_result,
    decode_value,
    encode_result,
    encode_value,
    endpoint_key,
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
