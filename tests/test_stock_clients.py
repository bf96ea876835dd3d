"""Stock clients may send code (issue 10, section 4), in both of Flash's serialization formats.

A client that holds the ``flash local`` daemon's API key but not its secret (the stock ``runpod``
client, an unmodified runpod-flash program) sends a Flash ``FunctionRequest`` unsigned; the
daemon signs it for the endpoint's workers, which still run nothing unsigned. A request that
carries a signature is left to the worker, which refuses a bad one once (not retried); input
that is not a FunctionRequest gets HTTP 400. ``serialization_format: "json"`` carries plain
JSON ``args``/``kwargs`` and answers ``json_result``, with no pickle on the way.

The daemon tests run a real daemon and the stock ``runpod`` 1.12 client in a subprocess; the
executor tests run the worker's executor in this process.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cloudpickle
import msgspec
import pytest

from flash_actors import CpuLiveServerless, PayloadSignatureError, SerializationError
from flash_actors.endpoint import response_value
from flash_actors.messages import FunctionRequest, FunctionResponse, wire_encoder
from flash_actors.providers.local.daemon.catalog import config_of
from flash_actors.serialization import (
    RequestSigner,
    derive_key,
    encode_value,
    sign_request,
    verify_request,
)
from flash_actors.worker.executor import Executor
from tests._daemon import FILES, Daemon, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

NAME = "stock"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}

ADD = "async def add(a, b, scale=1):\n    return (a + b) * scale\n"
DESCRIBE = (
    "def describe(items, extra=None):\n"
    "    return {'items': items, 'n': len(items), 'extra': extra, 'pair': (1, 'two')}\n"
)
BOOM = "def boom(what):\n    raise ValueError(f'bad input: {what}')\n"
WHEN = (
    "def when():\n    import datetime\n    return {'at': [datetime.date(2026, 1, 2)]}\n"
)
COUNTER = (
    "class Counter:\n"
    "    def __init__(self, start, step=1):\n"
    "        self.n = start\n"
    "        self.step = step\n"
    "    def bump(self, times):\n"
    "        self.n += self.step * times\n"
    "        return {'n': self.n}\n"
)
CHUNKS = "def chunks(n):\n    for i in range(n):\n        yield {'i': i}\n"


def pickled(value: Any) -> str:
    """An argument as runpod-flash sends it: base64 of its cloudpickle."""
    return base64.b64encode(cloudpickle.dumps(value)).decode()


def flash_input(**fields: Any) -> dict[str, Any]:
    """A FunctionRequest as runpod-flash 1.21 sends it (PROTOCOL.md section 5), unsigned."""
    body: dict[str, Any] = {
        "args": [],
        "kwargs": {},
        "modules": {},
        "execution_type": "function",
        "constructor_args": [],
        "constructor_kwargs": {},
        "method_name": "__call__",
        "create_new_instance": True,
        "accelerate_downloads": True,
        "serialization_format": "cloudpickle",
    }
    body.update(fields)
    return body


def key_of(daemon: Daemon) -> bytes:
    """The endpoint's key, derived from the daemon's secret as the daemon does."""
    assert daemon.record is not None
    secret = bytes.fromhex(daemon.record.secret)
    return derive_key(secret, NAME)


def tampered(daemon: Daemon) -> dict[str, Any]:
    """``add(2, 3)`` signed with the endpoint's key, then its arguments swapped."""
    template = FunctionRequest(function_name="add", function_code=ADD)
    signed = RequestSigner(key_of(daemon), template).sign([2, 3], {})
    swapped = msgspec.structs.replace(signed, args=[pickled(200), pickled(300)])
    answer: dict[str, Any] = msgspec.to_builtins(swapped)
    return answer


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("stock") / ".flash")
    try:
        with d.client() as client:
            config = wire_encoder.encode(config_of(CpuLiveServerless(name=NAME)))
            answer = client.put(f"/flash/v1/endpoints/{NAME}", content=config)
            assert answer.status_code == 200, answer.text
        yield d
    finally:
        d.stop()


def run_stock_client(daemon: Daemon, cases: dict[str, Any], tmp_path: Path) -> Any:
    assert daemon.record is not None
    env = dict(os.environ)
    env["RUNPOD_ENDPOINT_BASE_URL"] = f"{daemon.record.url}/v2"
    env["RUNPOD_API_KEY"] = daemon.record.api_key
    spec = tmp_path / "cases.json"
    spec.write_text(json.dumps({name: {"input": body} for name, body in cases.items()}))
    done = subprocess.run(
        [sys.executable, str(FILES / "stock_flash_client.py"), NAME, str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


# --- the stock runpod client -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_stock_runpod_client_runs_unsigned_flash_requests(
    daemon: Daemon, tmp_path: Path
) -> None:
    cases = {
        "pickled": flash_input(
            function_name="add",
            function_code=ADD,
            args=[pickled(2), pickled(3)],
            kwargs={"scale": pickled(10)},
        ),
        "json": flash_input(
            function_name="describe",
            function_code=DESCRIBE,
            args=[[1, "two", None, 2.5]],
            kwargs={"extra": {"b": True, "a": {"deep": [1]}}},
            serialization_format="json",
        ),
        "json_class": flash_input(
            execution_type="class",
            class_name="Counter",
            class_code=COUNTER,
            constructor_args=[5],
            constructor_kwargs={"step": 10},
            method_name="bump",
            args=[2],
            serialization_format="json",
        ),
        "raised": flash_input(
            function_name="boom", function_code=BOOM, args=[pickled("x")]
        ),
        "not_json": flash_input(
            function_name="when", function_code=WHEN, serialization_format="json"
        ),
        "tampered": tampered(daemon),
        "ints_as_pickles": flash_input(
            function_name="add", function_code=ADD, args=[2, 3]
        ),
        "no_function_name": flash_input(function_code=ADD),
        "bad_execution_type": flash_input(function_name="add", execution_type="method"),
    }
    out = run_stock_client(daemon, cases, tmp_path)

    response = out["pickled"]["run_sync"]
    assert response["success"] is True
    assert cloudpickle.loads(base64.b64decode(response["result"])) == 50
    assert "json_result" not in response

    response = out["json"]["run_sync"]
    assert response["success"] is True
    assert "result" not in response  # no pickle on the json path
    assert response["json_result"] == {
        "items": [1, "two", None, 2.5],
        "n": 4,
        "extra": {"b": True, "a": {"deep": [1]}},
        "pair": [1, "two"],
    }
    assert out["json_class"]["run_sync"]["json_result"] == {"n": 25}

    # A remote exception is a FunctionResponse, as Flash's workers answer it.
    response = out["raised"]["run_sync"]
    assert response["success"] is False
    assert response["error_message"] == "bad input: x"
    assert "ValueError: bad input: x" in response["error"]

    response = out["not_json"]["run_sync"]
    assert response["success"] is False
    assert response["error_type"] == "flash_actors.errors.SerializationError"
    assert response["error_message"].startswith(
        "the return value of when() is not JSON-serialisable: "
        "its item ['at'][0] is a datetime.date;"
    )

    # A bad signature fails the job once, with the worker's refusal; run_sync gives None.
    refused = out["tampered"]
    assert refused["run_sync"] is None
    assert refused["status"] == "FAILED"
    assert refused["retries"] == 0
    assert refused["error"].startswith(f"worker {NAME}-")
    assert (
        "refused the job: PayloadSignatureError: refusing request for 'add': "
        "its signature does not match"
    ) in refused["error"]

    # Input that is not a FunctionRequest is refused at once, naming the field.
    assert out["ints_as_pickles"] == {
        "http": 400,
        "body": {
            "error": "input is not a Flash FunctionRequest: `args[0]` is of type int, not a "
            'base64 cloudpickle string (plain JSON values need serialization_format "json")'
        },
    }
    assert out["no_function_name"]["http"] == 400
    assert out["no_function_name"]["body"]["error"] == (
        "input is not a Flash FunctionRequest: "
        'function_name is required when execution_type is "function"'
    )
    assert out["bad_execution_type"]["http"] == 400
    assert out["bad_execution_type"]["body"]["error"].startswith(
        "input is not a Flash FunctionRequest: Invalid enum value 'method' - at "
        "`$.execution_type`"
    )


# --- raw HTTP ----------------------------------------------------------------------------------


def test_raw_http_runs_both_formats(daemon: Daemon) -> None:
    with daemon.client() as client:
        body = client.post(
            f"/v2/{NAME}/runsync",
            json={
                "input": flash_input(
                    function_name="add",
                    function_code=ADD,
                    args=[pickled(2), pickled(3)],
                )
            },
        ).json()
        assert body["status"] == "COMPLETED", body
        assert cloudpickle.loads(base64.b64decode(body["output"]["result"])) == 5

        posted = client.post(
            f"/v2/{NAME}/run",
            json={
                "input": flash_input(
                    function_name="add",
                    function_code=ADD,
                    args=[2, 3],
                    kwargs={"scale": 2},
                    serialization_format="json",
                )
            },
        )
        assert posted.status_code == 200, posted.text
        body = wait_for(client, NAME, posted.json()["id"], FINAL)
        assert body["status"] == "COMPLETED", body
        assert body["output"]["json_result"] == 10
        assert body["retries"] == 0

        # An unsigned payload that is not base64 cannot be signed: refused by name.
        refused = client.post(
            f"/v2/{NAME}/run",
            json={"input": flash_input(function_name="add", args=["gAVLAi4=", "no!"])},
        )
        assert refused.status_code == 400
        assert refused.json()["error"].startswith(
            "input is not a Flash FunctionRequest: argument 1 is not valid base64"
        )

        # JSON values are typed: a huge integer cannot reach a worker.
        refused = client.post(
            f"/v2/{NAME}/run",
            json={
                "input": flash_input(
                    function_name="add", args=[2**70, 1], serialization_format="json"
                )
            },
        )
        assert refused.status_code == 400
        assert refused.json()["error"].startswith(
            "input is not a Flash FunctionRequest: `args` is not JSON-serialisable: "
            "its item [0] is an int outside the 64-bit range;"
        )


# --- the executor, json format ---------------------------------------------------------------

KEY = b"j" * 32


def json_request(**fields: Any) -> FunctionRequest:
    return sign_request(FunctionRequest(serialization_format="json", **fields), KEY)


async def test_executor_runs_json_functions_with_no_pickle(tmp_path: Path) -> None:
    executor = Executor(KEY)
    tripwire = tmp_path / "unpickled"
    # A string that is a valid base64 pickle: unpickling it would create the file.
    trap = encode_value(_Tripwire(tripwire))
    request = json_request(
        function_name="describe",
        function_code=DESCRIBE,
        args=[[trap, 1]],
        kwargs={"extra": {"z": 1, "a": [None, 1.5]}},
    )
    response = await executor.execute(request)
    assert response.success, response.error
    assert response.result is None
    assert response.signature is None
    expected = {
        "items": [trap, 1],
        "n": 2,
        "extra": {"z": 1, "a": [None, 1.5]},
        "pair": [1, "two"],
    }
    assert response.json_result == expected
    assert not tripwire.exists()
    # Our client reads json_result too.
    assert response_value(response, KEY) == expected
    # The answer crosses the wire as it is.
    wire = msgspec.json.decode(wire_encoder.encode(response), type=FunctionResponse)
    assert wire.json_result == expected


async def test_executor_runs_json_classes_and_keeps_instances() -> None:
    executor = Executor(KEY)
    fields: dict[str, Any] = {
        "execution_type": "class",
        "class_name": "Counter",
        "class_code": COUNTER,
        "method_name": "bump",
        "instance_id": "c1",
    }
    first = await executor.execute(
        json_request(
            constructor_args=[1], constructor_kwargs={"step": 3}, args=[1], **fields
        )
    )
    assert first.json_result == {"n": 4}
    again = await executor.execute(
        json_request(args=[2], create_new_instance=False, **fields)
    )
    assert again.json_result == {"n": 10}


async def test_executor_streams_json_chunks() -> None:
    executor = Executor(KEY)
    chunks: list[FunctionResponse] = []

    async def emit(chunk: FunctionResponse) -> None:
        chunks.append(chunk)

    request = json_request(function_name="chunks", function_code=CHUNKS, args=[3])
    end = await executor.stream(request, emit)
    assert end.success
    assert [c.json_result for c in chunks] == [{"i": 0}, {"i": 1}, {"i": 2}]
    assert all(c.result is None for c in chunks)


async def test_a_result_that_is_not_json_fails_naming_its_type() -> None:
    response = await Executor(KEY).execute(
        json_request(function_name="when", function_code=WHEN)
    )
    assert response.success is False
    assert response.error_type == "flash_actors.errors.SerializationError"
    assert response.error_message is not None
    assert response.error_message.startswith(
        "the return value of when() is not JSON-serialisable: "
        "its item ['at'][0] is a datetime.date;"
    )
    with pytest.raises(SerializationError, match=r"^the return value of when\(\)"):
        response_value(response, KEY)


async def test_json_arguments_are_signed() -> None:
    executor = Executor(KEY)
    signed = json_request(
        function_name="add",
        function_code=ADD,
        args=[2, 3],
        kwargs={"scale": {"b": 1, "a": 2}},
    )
    # The signature covers the values, not their spelling: keys in another order still hold.
    reordered = msgspec.structs.replace(signed, kwargs={"scale": {"a": 2, "b": 1}})
    verify_request(reordered, KEY)
    for changed in (
        {"args": [2, 4]},
        {"args": ["2", 3]},
        {"kwargs": {"scale": {"b": 1, "a": 3}}},
        {"constructor_args": [1]},
        {
            "serialization_format": "cloudpickle",
            "args": [pickled(2), pickled(3)],
            "kwargs": {"scale": pickled({"b": 1, "a": 2})},
        },
    ):
        with pytest.raises(PayloadSignatureError, match=r"^refusing request for 'add'"):
            await executor.execute(msgspec.structs.replace(signed, **changed))
    unsigned = msgspec.structs.replace(signed, signature=None)
    with pytest.raises(PayloadSignatureError, match=r"^refusing unsigned request"):
        await executor.execute(unsigned)


def test_request_signer_refuses_a_json_template() -> None:
    template = FunctionRequest(function_name="add", serialization_format="json")
    with pytest.raises(
        SerializationError, match=r"^RequestSigner pickles its arguments"
    ):
        RequestSigner(KEY, template)


class _Tripwire:
    """Unpickling it creates a file: proof that something was unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))
