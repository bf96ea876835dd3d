"""The RunPod data-plane client and its queue backend, without the daemon's capabilities.

`RecordingTransport` plays RunPod's ``/v2`` API (the cloud cannot be reached from here), as
PROTOCOL.md section 1 documents it; what matters is what the client sends, and that no call
ever creates a second job: a submission is sent again only when it provably never arrived.
End-to-end runs against ``flash local`` are in ``tests/test_runpod_provider.py``.
"""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest

from flash_actors import remote, runtime
from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    DeliveryUncertainError,
    FlashRuntimeError,
)
from flash_actors.jobs import JobOutput
from flash_actors.providers.runpod.backend import (
    RUNSYNC_WAIT_MS,
    QueueBackend,
    keep_trying,
)
from flash_actors.providers.runpod.dataplane import (
    FLASH_LOCAL,
    RUNPOD,
    Backoff,
    DataPlane,
)
from flash_actors.providers.runpod.provider import RunPodProvider, lb_target
from flash_actors.providers.runpod.transport import (
    RecordedRequest,
    RecordingTransport,
    Response,
    json_response,
)
from flash_actors.resources import CpuLiveServerless
from flash_actors.serialization import encode_value

BASE = "https://api.runpod.ai/v2"
KEY = "rp-key"


LOST_ANSWER = DeliveryError("the connection broke while reading the answer")
"""A fault for `FakeQueue`: the job is created, then the connection breaks before its answer."""


class FakeQueue:
    """RunPod's job API for one endpoint, in memory; ``faults`` answer the next submissions.

    A job is found running by its first ``running_polls`` looks (``/runsync``'s wait and
    each ``/status``), then COMPLETED: ``/runsync`` answers the ended envelope when the job
    ends within its wait, else a non-terminal status plus ``id`` (PROTOCOL.md section 1).
    """

    def __init__(self, *, running_polls: int = 1) -> None:
        self.jobs: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.running_polls = running_polls
        self.faults: list[Response | Exception] = []
        self.cancelled: list[str] = []
        self._ids = itertools.count(1)

    def __call__(self, request: RecordedRequest) -> Response:
        assert request.headers["authorization"] == f"Bearer {KEY}"
        path = request.url.removeprefix(BASE).split("?")[0]
        if path.endswith(("/run", "/runsync")):
            fault = self.faults.pop(0) if self.faults else None
            if isinstance(fault, Response):
                return fault
            if fault is not None and fault is not LOST_ANSWER:
                raise fault
            body = request.json()
            job_id = f"job-{next(self._ids)}"
            self.jobs[job_id] = body
            self.polls[job_id] = 0
            if fault is LOST_ANSWER:
                raise fault
            if path.endswith("/runsync"):
                return self.look(job_id)
            return json_response({"id": job_id, "status": "IN_QUEUE"})
        if "/status/" in path:
            return self.look(path.rsplit("/", 1)[1])
        if "/cancel/" in path:
            job_id = path.rsplit("/", 1)[1]
            self.cancelled.append(job_id)
            return json_response({"id": job_id, "status": "CANCELLED"})
        return json_response({"error": "not found"}, status=404)

    def look(self, job_id: str) -> Response:
        """The job's envelope at one more look: running, or COMPLETED with 42."""
        self.polls[job_id] += 1
        if self.polls[job_id] <= self.running_polls:
            return json_response({"id": job_id, "status": "IN_PROGRESS"})
        output = {"success": True, "result": encode_value(42)}
        return json_response(
            {
                "id": job_id,
                "status": "COMPLETED",
                "output": output,
                "delayTime": 1,
                "executionTime": 2,
            }
        )


def runpod_over(fake: FakeQueue) -> tuple[RunPodProvider, RecordingTransport]:
    """The RunPod provider with RunPod's URLs, its requests answered by ``fake``."""
    transport = RecordingTransport(fake)
    provider = RunPodProvider(
        api_key=KEY,
        api_url="https://api.runpod.io",
        endpoint_url=BASE,
        transport=transport,
    )
    return provider, transport


def plane(fake: FakeQueue, **kwargs: Any) -> tuple[DataPlane, RecordingTransport]:
    transport = RecordingTransport(fake)
    backoff = Backoff(first_s=0.001, max_s=0.01)
    return DataPlane(transport, BASE, KEY, backoff=backoff, **kwargs), transport


async def test_without_capabilities_no_job_id_no_long_poll_no_stream_flag() -> None:
    fake = FakeQueue(running_polls=2)
    dp, transport = plane(fake)
    envelope = await dp.run("ep1", {"x": 1}, job_id="mine", stream=True)
    assert envelope.id == "job-1"
    assert fake.jobs["job-1"] == {"input": {"x": 1}}
    done = await dp.wait("ep1", envelope)
    assert done.status == "COMPLETED"
    statuses = [r.url for r in transport.requests if "/status/" in r.url]
    assert statuses == [f"{BASE}/ep1/status/job-1"] * 3  # polled, never ?wait=


async def test_with_the_daemons_capabilities_the_job_id_and_long_poll_are_sent() -> (
    None
):
    fake = FakeQueue(running_polls=0)
    dp, transport = plane(fake, capabilities=FLASH_LOCAL)
    await dp.run("ep1", {"x": 1}, job_id="mine", stream=True)
    assert fake.jobs["job-1"] == {"input": {"x": 1}, "id": "mine", "stream": True}
    envelope = await dp.status("ep1", "job-1", wait_ms=5000)
    assert envelope.status == "COMPLETED"
    assert transport.requests[-1].url == f"{BASE}/ep1/status/job-1?wait=5000"


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (json_response({"error": "throttled"}, status=429), "did not take"),
        (json_response({"error": "busy"}, status=503), "did not take"),
    ],
)
async def test_a_refused_submission_is_retried_and_makes_one_job(
    fault: Response, expected: str
) -> None:
    """429/503 mean "not created": the Endpoint actor sends it again; one job in all."""
    del expected
    fake = FakeQueue()
    fake.faults.append(fault)
    provider, transport = runpod_over(fake)
    await _call_one(provider, fake)
    assert len(submissions(transport)) == 2
    assert len(fake.jobs) == 1


@pytest.mark.parametrize(
    "fault",
    [
        json_response({"error": "internal"}, status=500),
        DeliveryError("the connection broke while sending"),
        LOST_ANSWER,
    ],
    ids=["http-500", "broken-connection", "broken-during-the-wait"],
)
async def test_a_submission_that_may_have_arrived_is_not_sent_again(
    fault: Response | Exception,
) -> None:
    fake = FakeQueue()
    fake.faults.append(fault)
    provider, transport = runpod_over(fake)
    job = await _call_one(provider, fake, expect=None)
    assert isinstance(job.exception, DeliveryUncertainError)
    assert "not sent again" in job.error
    assert data_plane(transport) == [("POST", f"/runsync?wait={RUNSYNC_WAIT_MS}")]
    assert len(fake.jobs) == (1 if fault is LOST_ANSWER else 0)


async def test_a_job_that_ends_within_the_wait_costs_one_request() -> None:
    """``/runsync`` hands the ended job back: no ``/status``, no sleep."""
    fake = FakeQueue(running_polls=0)
    provider, transport = runpod_over(fake)
    await _call_one(provider, fake)
    assert data_plane(transport) == [("POST", f"/runsync?wait={RUNSYNC_WAIT_MS}")]
    (runsync,) = submissions(transport)
    assert runsync.timeout_s is not None
    assert runsync.timeout_s > RUNSYNC_WAIT_MS / 1000  # the answer may take the wait
    assert set(runsync.json()) <= {"input", "policy"}  # no caller id, no stream flag


async def test_a_job_that_outlives_the_wait_is_finished_by_polling_status() -> None:
    fake = FakeQueue(
        running_polls=3
    )  # the runsync's wait and two polls find it running
    provider, transport = runpod_over(fake)
    await _call_one(provider, fake)
    assert data_plane(transport) == [
        ("POST", f"/runsync?wait={RUNSYNC_WAIT_MS}"),
        ("GET", "/status/job-1"),
        ("GET", "/status/job-1"),
        ("GET", "/status/job-1"),
    ]
    assert len(fake.jobs) == 1


async def test_a_job_whose_status_cannot_be_read_is_cancelled_not_sent_again() -> None:
    fake = FakeQueue(running_polls=1)

    def unreachable_status(request: RecordedRequest) -> Response:
        if "/status/" in request.url:
            raise DeliveryError("the connection broke")
        return fake(request)

    dp, transport = plane(fake)
    transport.handler = unreachable_status
    backend = QueueBackend(
        dp, "ep1", persist=lambda key, attempt: keep_trying(0.0, key, attempt)
    )
    with pytest.raises(DeliveryUncertainError, match=r"^lost track of job job-1 on "):
        await backend.run_payload({"x": 1}, {}, "ignored")
    assert fake.cancelled == ["job-1"]
    assert len(submissions(transport)) == 1


async def test_a_caller_cancelled_during_the_runsync_waits_for_the_id_and_cancels() -> (
    None
):
    """The job's id comes only with the answer: without it the job would run unseen."""
    fake = FakeQueue(running_polls=10**9)
    arrived, released = anyio.Event(), anyio.Event()

    async def held(request: RecordedRequest) -> Response:
        answer = fake(request)
        if "/runsync" in request.url:
            arrived.set()
            await released.wait()
        return answer

    dp, transport = plane(fake)
    transport.handler = held
    backend = QueueBackend(dp, "ep1")
    caller = anyio.CancelScope()

    async def call() -> None:
        with caller:
            await backend.run_payload({"x": 1}, {}, "ignored")

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            await arrived.wait()
            caller.cancel()
            await anyio.wait_all_tasks_blocked()
            assert fake.cancelled == []  # the answer, and the id, are still coming
            released.set()
    assert caller.cancelled_caught
    assert fake.cancelled == ["job-1"]
    assert len(submissions(transport)) == 1


def submissions(transport: RecordingTransport) -> list[RecordedRequest]:
    """The requests that create a job (``/run``, ``/runsync``)."""
    return [
        r
        for r in transport.requests
        if r.url.split("?")[0].endswith(("/run", "/runsync"))
    ]


def data_plane(transport: RecordingTransport) -> list[tuple[str, str]]:
    """Each data-plane request to the ``_call_one`` endpoint: method, path and query."""
    prefix = f"{BASE}/ep-dp"
    return [
        (r.method, r.url.removeprefix(prefix))
        for r in transport.requests
        if r.url.startswith(prefix)
    ]


async def test_a_cancelled_caller_cancels_the_job() -> None:
    fake = FakeQueue(running_polls=10**9)
    provider, _ = runpod_over(fake)
    with anyio.move_on_after(0.5):
        await _call_one(provider, fake)
    assert fake.cancelled == ["job-1"]


async def test_every_operation_goes_to_its_route() -> None:
    """run, runsync, status, stream, cancel, retry, purge-queue, health, metrics."""

    def answer(request: RecordedRequest) -> Response:
        if request.url.endswith(("/purge-queue",)):
            return json_response({"removed": 2, "status": "completed"})
        if request.url.endswith(("/health", "/metrics")):
            return json_response({"jobs": {}, "workers": {}})
        return json_response({"id": "j1", "status": "COMPLETED", "stream": []})

    transport = RecordingTransport(answer)
    dp = DataPlane(transport, BASE, KEY)
    await dp.run("ep", {"a": 1}, policy={"ttl": 5000})
    await dp.runsync("ep", {"a": 1}, wait_ms=2000)
    await dp.status("ep", "j1")
    await dp.stream("ep", "j1")
    await dp.cancel("ep", "j1")
    await dp.retry("ep", "j1")
    assert (await dp.purge_queue("ep"))["removed"] == 2
    await dp.health("ep")
    await dp.metrics("ep")
    assert [
        (r.method, r.url.removeprefix(f"{BASE}/ep")) for r in transport.requests
    ] == [
        ("POST", "/run"),
        ("POST", "/runsync?wait=2000"),
        ("GET", "/status/j1"),
        ("GET", "/stream/j1"),
        ("POST", "/cancel/j1"),
        ("POST", "/retry/j1"),
        ("POST", "/purge-queue"),
        ("GET", "/health"),
        ("GET", "/metrics"),
    ]
    assert transport.requests[0].json() == {"input": {"a": 1}, "policy": {"ttl": 5000}}


async def test_http_errors_map_onto_the_error_tree() -> None:
    def answer(request: RecordedRequest) -> Response:
        if "/health" in request.url:
            return json_response({"error": "bad key"}, status=401)
        if "/metrics" in request.url:
            return json_response({"error": "no such endpoint"}, status=404)
        return json_response({"error": "oops"}, status=502)

    dp = DataPlane(RecordingTransport(answer), BASE, KEY, capabilities=RUNPOD)
    with pytest.raises(
        ConfigurationError, match=r"rejected the API key \(RUNPOD_API_KEY\)"
    ):
        await dp.health("ep")
    with pytest.raises(FlashRuntimeError, match=r"no such endpoint or job"):
        await dp.metrics("ep")
    with pytest.raises(DeliveryError, match=r"failed on ep/purge-queue \(502\)"):
        await dp.purge_queue("ep")


def test_load_balancer_hosts() -> None:
    assert lb_target("https://api.runpod.ai/v2", "abc") == (
        "https://abc.api.runpod.ai",
        {},
    )
    assert lb_target("http://127.0.0.1:8123/v2", "abc") == (
        "http://127.0.0.1:8123",
        {"host": "abc.127.0.0.1:8123"},
    )


async def _call_one(
    provider: RunPodProvider, fake: FakeQueue, *, expect: int | None = 42
) -> JobOutput:
    """One queue call through a runtime on ``provider``, against ``fake``'s endpoint."""
    config = CpuLiveServerless(name="dp-test")

    @remote(resource_config=config)
    async def answer() -> int:
        return 42

    async def save(request: RecordedRequest) -> Response:
        if request.url.endswith("/graphql"):
            query = request.json()["query"]
            if "myself" in query:
                return json_response({"data": {"myself": {"endpoints": []}}})
            saved = {**request.json()["variables"]["input"], "id": "ep-dp"}
            saved.pop("template", None)
            return json_response({"data": {"saveEndpoint": saved}})
        return fake(request)

    assert isinstance(provider._transport, RecordingTransport)
    provider._transport.handler = save
    async with runtime(provider=provider):
        job = await answer()
    if expect is not None:
        assert job.output == expect, job.error
    return job
