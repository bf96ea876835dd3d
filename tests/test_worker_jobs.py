"""A worker's ``/execute`` queue, spoken to over HTTP: order, slots, withdraw and cancel.

A real worker process (``python -m flash_actors.worker``) on 127.0.0.1, batches of signed
requests in msgpack as the local pool sends them, and the answer frames read as they come.
The jobs' code records what ran, in order, in a file; a gate job holds the worker's only
slot until the test creates its gate file.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import httpx
import msgspec
import pytest

from flash_actors.messages import FunctionRequest
from flash_actors.serialization import RequestSigner, decode_result
from tests._worker import worker_process

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, AsyncIterator, Iterator

KEY = bytes.fromhex("cd" * 32)

LOG = """
def log(path, item):
    with open(path, "a") as f:
        f.write(f"{item}\\n")
    return item
"""

ALOG = """
async def alog(path, item):
    with open(path, "a") as f:
        f.write(f"{item}\\n")
    return item
"""

GATE = """
async def gate(gate_path, log_path):
    import asyncio, os

    while not os.path.exists(gate_path):
        await asyncio.sleep(0.01)
    with open(log_path, "a") as f:
        f.write("gate\\n")
    return "open"
"""

_log = RequestSigner(KEY, FunctionRequest(function_name="log", function_code=LOG))
_alog = RequestSigner(KEY, FunctionRequest(function_name="alog", function_code=ALOG))
_gate = RequestSigner(KEY, FunctionRequest(function_name="gate", function_code=GATE))
_packer = msgspec.msgpack.Encoder()


class Done(msgspec.Struct, frozen=True):
    """One answer frame (the fields a test reads)."""

    id: str
    response: dict[str, Any] | None = None
    refused: str | None = None
    started: bool = False
    withdrawn: bool = False


_done = msgspec.msgpack.Decoder(Done)


@pytest.fixture
def worker() -> Iterator[tuple[str, str]]:
    """A worker process on an inherited socket: its URL and bearer token."""
    env = {"FLASH_ENDPOINT_KEY": KEY.hex(), "FLASH_WORKER_ID": "w-test"}
    with worker_process(env) as (port, token, _):
        yield f"http://127.0.0.1:{port}", token


def _job(job_id: str, request: FunctionRequest, *, ahead: bool = True) -> Any:
    return {"id": job_id, "request": request, "ahead": ahead}


class Batch:
    """One ``/execute`` request in flight: its answer frames, read as they come."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self._buffer = b""
        self.seen: list[Done] = []

    async def next(self) -> Done:
        """The next answer frame."""
        while True:
            if len(self._buffer) >= 4:
                (size,) = struct.unpack_from(">I", self._buffer)
                if len(self._buffer) >= 4 + size:
                    done = _done.decode(self._buffer[4 : 4 + size])
                    self._buffer = self._buffer[4 + size :]
                    self.seen.append(done)
                    return done
            self._buffer += await self._chunks.__anext__()

    async def drain(self) -> None:
        """Read to the end of the answer (it ends once every job is answered)."""
        async for chunk in self._chunks:
            self._buffer += chunk
        while self._buffer:
            assert len(self._buffer) >= 4, "a frame was cut short"
            await self.next()

    async def until_answered(self, *ids: str) -> dict[str, Done]:
        """Read frames until each of ``ids`` has its final answer (not ``started``)."""
        finals = {d.id: d for d in self.seen if not d.started}
        while not set(ids) <= finals.keys():
            done = await self.next()
            if not done.started:
                finals[done.id] = done
        return finals


class Worker:
    def __init__(self, client: httpx.AsyncClient, url: str, token: str) -> None:
        self.client = client
        self.url = url
        self.headers = {"Authorization": f"Bearer {token}"}

    @contextlib.asynccontextmanager
    async def execute(self, jobs: list[Any]) -> AsyncIterator[Batch]:
        """Send one batch; its answers are read from the `Batch` as they come."""
        body = _packer.encode({"jobs": jobs, "concurrency": 1})
        async with (
            self.client.stream(
                "POST",
                f"{self.url}/execute",
                content=body,
                headers={**self.headers, "Content-Type": "application/msgpack"},
            ) as r,
            contextlib.aclosing(cast("AsyncGenerator[bytes]", r.aiter_raw())) as chunks,
        ):
            assert r.status_code == 200
            batch = Batch(chunks)
            yield batch
            await batch.drain()

    async def post(self, path: str, ids: list[str]) -> Any:
        r = await self.client.post(
            f"{self.url}{path}", json={"ids": ids}, headers=self.headers
        )
        assert r.status_code == 200, r.text
        return r.json()


@pytest.fixture
async def client(worker: tuple[str, str]) -> AsyncIterator[Worker]:
    async with httpx.AsyncClient(timeout=30) as http:
        yield Worker(http, *worker)


def _value(done: Done) -> Any:
    assert done.response is not None, done
    assert done.response["success"], done.response
    assert done.response["worker_id"] == "w-test"
    return decode_result(done.response["result"], done.response["signature"], KEY)


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


async def test_jobs_run_one_at_a_time_in_arrival_order_across_batches(
    client: Worker, tmp_path: Path
) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"
    first = [
        _job("g", _gate.sign([str(gate), str(log)], {}), ahead=False),
        _job("a1", _log.sign([str(log), "a1"], {})),
        _job("a2", _log.sign([str(log), "a2"], {})),
    ]
    second = [
        _job("b1", _log.sign([str(log), "b1"], {})),
        _job("b2", _log.sign([str(log), "b2"], {}), ahead=False),
    ]
    async with client.execute(first) as one:
        # the headers are out: the worker holds the batch's jobs
        async with client.execute(second) as two:
            gate.touch()
            answers = await one.until_answered("g", "a1", "a2")
            answers |= await two.until_answered("b1", "b2")
    assert {i: _value(d) for i, d in answers.items()} == {
        "g": "open",
        "a1": "a1",
        "a2": "a2",
        "b1": "b1",
        "b2": "b2",
    }
    # one slot: nothing started before the gate job ended, then arrival order
    assert _lines(log) == ["gate", "a1", "a2", "b1", "b2"]
    # every job that waited says when it starts, before its answer
    seen = one.seen + two.seen
    started = [d.id for d in seen if d.started]
    assert started == ["a1", "a2", "b1", "b2"]
    for batch in (one, two):
        order = [(d.id, d.started) for d in batch.seen]
        for job_id in ("a1", "a2", "b1", "b2"):
            if (job_id, True) in order:
                assert order.index((job_id, True)) < order.index((job_id, False))


async def test_a_waiting_job_is_withdrawn_or_cancelled_at_once_and_never_runs(
    client: Worker, tmp_path: Path
) -> None:
    log, gate = tmp_path / "log", tmp_path / "gate"
    jobs = [
        _job("g", _gate.sign([str(gate), str(log)], {})),
        _job("w", _log.sign([str(log), "w"], {})),
        _job("c", _log.sign([str(log), "c"], {})),
        _job("n", _log.sign([str(log), "n"], {})),
    ]
    async with client.execute(jobs) as batch:
        assert await client.post("/withdraw", ["w", "g"]) == {"withdrawn": ["w"]}
        assert await client.post("/cancel", ["c"]) == {"cancelled": ["c"], "stuck": []}
        # both answered while the gate job still holds the slot
        answers = await batch.until_answered("w", "c")
        assert answers["w"].withdrawn
        assert answers["c"].response is not None
        assert answers["c"].response["error_type"] == "cancelled"
        assert _lines(log) == []
        # taken back already: neither can be withdrawn or cancelled again
        assert await client.post("/withdraw", ["w", "c"]) == {"withdrawn": []}
        assert await client.post("/cancel", ["w", "c"]) == {
            "cancelled": [],
            "stuck": [],
        }
        gate.touch()
        answers = await batch.until_answered("g", "n")
    assert _value(answers["g"]) == "open"
    assert _value(answers["n"]) == "n"
    assert _lines(log) == ["gate", "n"]
    assert [d.id for d in batch.seen if d.started] == ["g", "n"]


async def test_a_cancelled_running_job_frees_its_slot_for_the_next(
    client: Worker, tmp_path: Path
) -> None:
    log, gate = tmp_path / "log", tmp_path / "never"
    jobs = [
        _job("g", _gate.sign([str(gate), str(log)], {}), ahead=False),
        _job("n", _log.sign([str(log), "n"], {})),
    ]
    async with client.execute(jobs) as batch:
        ping = await client.client.get(f"{client.url}/ping")
        assert ping.json() == {"status": "ok", "running": 2}
        assert await client.post("/cancel", ["g"]) == {"cancelled": ["g"], "stuck": []}
        answers = await batch.until_answered("g", "n")
    assert answers["g"].response is not None
    assert answers["g"].response["error_type"] == "cancelled"
    assert answers["g"].response["worker_id"] == "w-test"
    assert _value(answers["n"]) == "n"
    assert _lines(log) == ["n"]
    ping = await client.client.get(f"{client.url}/ping")
    assert ping.json() == {"status": "ok", "running": 0}


async def test_a_forged_job_is_refused_and_the_batch_goes_on(
    client: Worker, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    forged = msgspec.structs.replace(
        _log.sign([str(log), "x"], {}), args=_log.sign([str(log), "y"], {}).args
    )
    jobs = [_job("f", forged), _job("n", _log.sign([str(log), "n"], {}))]
    async with client.execute(jobs) as batch:
        answers = await batch.until_answered("f", "n")
    assert answers["f"].refused is not None
    assert answers["f"].refused.startswith("PayloadSignatureError: refusing request")
    assert _value(answers["n"]) == "n"
    assert _lines(log) == ["n"]


async def test_an_answer_is_not_held_back_by_the_job_started_after_it(
    client: Worker, tmp_path: Path
) -> None:
    # Answers of jobs that end in their first step wait for those of the jobs after them,
    # to leave in one write; not for one that waits (here, for the gate).
    log, gate = tmp_path / "log", tmp_path / "gate"
    jobs = [
        _job("q1", _alog.sign([str(log), "q1"], {}), ahead=False),
        _job("q2", _alog.sign([str(log), "q2"], {})),
        _job("g", _gate.sign([str(gate), str(log)], {})),
        _job("q3", _alog.sign([str(log), "q3"], {})),
    ]
    async with client.execute(jobs) as batch:
        answers = await batch.until_answered("q1", "q2")
        gate.touch()
        answers |= await batch.until_answered("g", "q3")
    assert [_value(answers[i]) for i in ("q1", "q2", "g", "q3")] == [
        "q1",
        "q2",
        "open",
        "q3",
    ]
    assert _lines(log) == ["q1", "q2", "gate", "q3"]


def test_a_batch_whose_jobs_all_start_at_once_sends_headers_with_its_first_answer(
    worker: tuple[str, str], tmp_path: Path
) -> None:
    # One write for the headers and the answer: the client wakes once, not twice. (A batch
    # with jobs that wait sends its headers at once: the tests above would hang otherwise.)
    url, token = worker
    port = int(url.rsplit(":", 1)[1])
    body = _packer.encode(
        {
            "jobs": [_job("q", _log.sign([str(tmp_path / "log"), "q"], {}))],
            "concurrency": 1,
        }
    )
    head = (
        f"POST /execute HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/msgpack\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + body)
        first = sock.recv(1 << 20)
    assert first.startswith(b"HTTP/1.1 200 "), first[:100]
    headers, _, rest = first.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in headers.lower()
    size_line, _, chunk = rest.partition(b"\r\n")
    assert int(size_line, 16) > 4, first  # a whole answer frame came with the headers
    (frame_size,) = struct.unpack_from(">I", chunk)
    assert _done.decode(chunk[4 : 4 + frame_size]).id == "q"
