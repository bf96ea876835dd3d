"""The fast paths of serialization give the same bytes and signatures as the plain ones."""

from __future__ import annotations

import collections

import cloudpickle
import pybase64
import pytest
from blake3 import blake3

from flash_actors.errors import SerializationError
from flash_actors.messages import FunctionRequest
from flash_actors.serialization import (
    RequestSigner,
    decode_request,
    decode_result,
    dumps,
    encode_result,
    loads,
    sign_request,
)

KEY = b"k" * 32
PLAIN = [
    {"a": 1.5, "b": [1, 2, (3, "x")], "c": None},
    [True, False, 10**40, -1.5, b"\x00\xff", bytearray(b"ab"), {1, 2}, frozenset({3})],
    "é" * 100,
    bytes(100_000),
    # the atoms pickled with one pickle.dumps call (a large one is framed alike)
    0,
    -7,
    2**70,
    1.25,
    True,
    None,
    "x",
    "é" * 4095,
    "y" * 4096,
    b"\x00" * 4095,
    b"\x01" * 70_000,
]


@pytest.mark.parametrize("value", PLAIN)
def test_plain_data_pickles_to_cloudpickles_own_bytes(value: object) -> None:
    assert dumps(value) == cloudpickle.dumps(value, protocol=5)


def test_other_objects_still_go_through_cloudpickle() -> None:
    def local(x: int) -> int:
        return x + 1

    counter = collections.Counter("aab")
    restored = loads(dumps({"f": local, "n": [counter]}))
    assert restored["f"](1) == 2  # pickled by value, as only cloudpickle does
    assert restored["n"][0] == counter
    assert type(restored["n"][0]) is collections.Counter


def test_unpicklable_value_is_still_named_in_the_error() -> None:
    signer = RequestSigner(KEY, FunctionRequest(function_name="f", function_code="x"))
    lock = __import__("threading").Lock()
    with pytest.raises(SerializationError, match=r"^cannot serialize argument 'n' "):
        signer.sign((lock,), {}, arg_names=("n",))
    with pytest.raises(SerializationError, match=r"^cannot serialize positional arg"):
        signer.sign((1, lock), {}, arg_names=("n",))


def test_signature_of_a_plain_call_matches_the_general_path() -> None:
    template = FunctionRequest(function_name="f", function_code="def f(x): ...")
    signer = RequestSigner(KEY, template)
    fast = signer.sign((1, "two"), {"k": 3.0})
    general = signer.sign((1, "two"), {"k": 3.0}, method_name="__call__")
    assert fast.signature == general.signature
    assert decode_request(fast, KEY).args == [1, "two"]
    assert decode_request(fast, KEY).kwargs == {"k": 3.0}


@pytest.mark.parametrize(
    "size", [10, 3 * 1024 * 1024]
)  # the large one: base64 in parallel
def test_result_signature_is_keyed_blake3_over_the_framed_pickle(size: int) -> None:
    text, signature = encode_result((bytes(range(256)) * (size // 256 + 1))[:size], KEY)
    raw = pybase64.b64decode(text)
    mac = blake3(b"v2:result\x00" + len(raw).to_bytes(8, "big") + raw, key=KEY)
    assert signature == "v2:" + mac.hexdigest()
    assert len(decode_result(text, signature, KEY)) == size


def _b64(raw: bytes) -> str:
    return pybase64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (
            FunctionRequest(
                function_name="f", function_code="def f(x): ...", args=[_b64(b"hello")]
            ),
            "v2:d3ea687e07e21bedb934684d86de64eb95f3e99fd3efdd4a4664470aa4759a4f",
        ),
        (
            FunctionRequest(
                function_name="f",
                function_code="def f(x): ...",
                args=[_b64(b"a" * 5000)],
                kwargs={"k": _b64(b"v")},
                constructor_args=[_b64(b"c")],
            ),
            "v2:549abb65bed13ebbe87e46d551725eea0efaa1edf332446efd8bb5e4bd095019",
        ),
        (
            FunctionRequest(
                class_name="C",
                class_code="class C: ...",
                execution_type="class",
                method_name="go",
                instance_id="i1",
                create_new_instance=False,
            ),
            "v2:905493379ea072dfd283ab3a5b893e5b541c678e4ef356582caf97794bd362ca",
        ),
    ],
)
def test_request_signatures_are_pinned(
    request_: FunctionRequest, expected: str
) -> None:
    # The MAC's byte stream is the wire format: the fast paths (cached prefixes, merged
    # updates) must feed exactly the bytes scheme v2 defines, whatever the call's shape.
    key = bytes(range(32))
    assert sign_request(request_, key).signature == expected
    decode_request(sign_request(request_, key), key, unpickle=False)


class _Unloadable:
    """Pickles fine; unpickling it raises (``int("not a number")``)."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (int, ("not a number",))


def test_an_argument_that_cannot_be_unpickled_is_named() -> None:
    signer = RequestSigner(
        KEY,
        FunctionRequest(
            function_name="f",
            function_code="def f(*a, **k): pass",
            execution_type="class",
            class_name="C",
            class_code="class C: pass",
        ),
    )
    cases = [
        (signer.sign([1, _Unloadable()], {}), "argument 1"),
        (signer.sign([], {"b": 2, "a": _Unloadable()}), "argument 'a'"),
        (
            signer.sign([], {}, constructor_args=[_Unloadable()]),
            "constructor argument 0",
        ),
        (
            signer.sign([], {}, constructor_kwargs={"z": _Unloadable()}),
            "constructor argument 'z'",
        ),
    ]
    for request, named in cases:
        with pytest.raises(
            SerializationError, match=rf"^cannot deserialize {named}: ValueError: "
        ):
            decode_request(request, KEY)
