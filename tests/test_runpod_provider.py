"""The RunPod provider, end to end, against ``flash local`` acting as RunPod.

The daemon runs with its own capabilities switched off (``--runpod-only``: caller job ids,
long-polled status and the stream flag are ignored, as RunPod ignores them), and the provider
declares none, so every byte goes as it would go to RunPod: GraphQL ``saveEndpoint``,
``/runsync`` (then polled ``/status`` for a job that outlives its wait), ``/cancel``,
``POST /execute`` on the load balancer's own host, and ``deleteEndpoint`` after scaling to
zero. The requests travel over `HttpsTransport` (plain
HTTP on 127.0.0.1); a recording transport in front of it shows that the provider pointed at
RunPod's real URLs sends exactly the same requests.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from flash_actors import (
    CpuLiveLoadBalancer,
    CpuLiveServerless,
    JobStatus,
    RemoteExecutionError,
    remote,
    runtime,
)
from flash_actors.providers.runpod.backend import RUNSYNC_WAIT_MS
from flash_actors.providers.runpod.dataplane import DataPlane
from flash_actors.providers.runpod.graphql import ControlPlane
from flash_actors.providers.runpod.provider import RunPodProvider
from flash_actors.providers.runpod.provisioning import list_endpoints, remove_endpoint
from flash_actors.providers.runpod.transport import (
    HttpsTransport,
    RecordedRequest,
    RecordingTransport,
    Response,
)
from tests._daemon import Daemon

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator

pytestmark = pytest.mark.slow

queue = CpuLiveServerless(name="rp-queue", workersMax=2)
balancer = CpuLiveLoadBalancer(name="rp-balancer")


@remote(resource_config=queue)
async def square(x: int) -> int:
    return x * x


@remote(resource_config=queue)
async def fails(text: str) -> None:
    raise ValueError(f"bad input: {text}")


@remote(resource_config=queue)
async def sleepy(seconds: float) -> str:
    import asyncio

    await asyncio.sleep(seconds)
    return "woke"


@remote(resource_config=queue)
class Tally:
    def __init__(self, start: int) -> None:
        self.total = start

    async def add(self, n: int) -> int:
        self.total += n
        return self.total


@remote(resource_config=balancer, method="POST", path="/shout")
async def shout(word: str) -> dict[str, str]:
    return {"word": word.upper()}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    project = tmp_path_factory.mktemp("runpod-provider")
    started = Daemon(project / ".flash", runpod_only=True)
    try:
        yield started
    finally:
        started.stop()


def provider_for(daemon: Daemon, transport: Any = None) -> RunPodProvider:
    record = daemon.record
    assert record is not None
    return RunPodProvider(
        api_key=record.api_key,
        api_url=record.url,
        endpoint_url=f"{record.url}/v2",
        transport=transport or HttpsTransport(),
    )


async def test_provision_call_class_error_and_load_balancer(daemon: Daemon) -> None:
    provider = provider_for(daemon)
    async with runtime(provider=provider):
        job = await square(7)
        assert job.status is JobStatus.COMPLETED, job.error
        assert job.output == 49

        tally = Tally(10)
        await tally.add(1)
        counted: Any = await tally.add(5)
        assert counted.output == 16  # the instance lived on the worker between calls

        job = await fails("x")
        assert job.status is JobStatus.FAILED
        with pytest.raises(ValueError, match=r"^bad input: x\n") as caught:
            job.raise_for_error()
        assert isinstance(caught.value, RemoteExecutionError)

        assert await shout("hey") == {"word": "HEY"}

    endpoint = provider.endpoints["rp-queue"]
    assert endpoint["name"] == "live-rp-queue"
    assert len(str(endpoint["id"])) == 14


async def test_cancelling_the_caller_cancels_the_job_on_runpod(daemon: Daemon) -> None:
    provider = provider_for(daemon)
    async with runtime(provider=provider):
        with anyio.move_on_after(3):
            await sleepy(60)
        endpoint_id = str(provider.endpoints["rp-queue"]["id"])
        assert provider.plane is not None
        jobs: dict[str, int] = {}
        with anyio.move_on_after(30):  # the cancel goes out as the caller leaves
            while True:
                jobs = (await provider.plane.health(endpoint_id))["jobs"]
                if jobs["inProgress"] == 0:
                    break
                await anyio.sleep(0.05)
    assert jobs["inProgress"] == 0
    assert jobs["inQueue"] == 0


@pytest.mark.timeout(600)  # 1,000 jobs each polled as RunPod is: minutes on a busy box
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_asyncio_gather_of_a_thousand_calls(daemon: Daemon) -> None:
    async with runtime(provider=provider_for(daemon)):
        jobs = await asyncio.gather(*(square(i) for i in range(1000)))
    assert [job.output for job in jobs] == [i * i for i in range(1000)]


@asynccontextmanager
async def at_the_cloud_urls(
    daemon: Daemon,
) -> AsyncIterator[tuple[RunPodProvider, RecordingTransport]]:
    """The provider pointed at RunPod's URLs, its requests recorded and sent to ``daemon``."""
    record = daemon.record
    assert record is not None
    https = HttpsTransport()
    local = record.url.removeprefix("http://")

    async def forward(request: RecordedRequest) -> Response:
        url, headers = request.url, dict(request.headers)
        if url.startswith("https://api.runpod.io/graphql"):
            url = f"{record.url}/graphql"
        elif url.startswith("https://api.runpod.ai/v2/"):
            url = f"{record.url}/v2/" + url.removeprefix("https://api.runpod.ai/v2/")
        else:  # a load balancer's own host: https://{id}.api.runpod.ai/...
            host, _, path = url.removeprefix("https://").partition("/")
            endpoint_id = host.split(".", 1)[0]
            headers["host"] = f"{endpoint_id}.{local}"
            url = f"{record.url}/{path}"
        return await https.request(
            request.method,
            url,
            body=request.body,
            headers=headers,
            timeout_s=request.timeout_s,
        )

    recording = RecordingTransport(forward)
    provider = RunPodProvider(
        api_key=record.api_key,
        api_url="https://api.runpod.io",
        endpoint_url="https://api.runpod.ai/v2",
        transport=recording,
    )
    try:
        yield provider, recording
    finally:
        await https.aclose()


async def test_the_cloud_urls_get_the_same_requests(daemon: Daemon) -> None:
    """Pointed at RunPod's URLs, the provider sends what worked against flash local."""
    record = daemon.record
    assert record is not None
    async with at_the_cloud_urls(daemon) as (provider, recording):
        async with runtime(provider=provider):
            job = await square(3)
            assert job.output == 9
            assert await shout("x") == {"word": "X"}
    queue_id = provider.endpoints["rp-queue"]["id"]
    lb_id = provider.endpoints["rp-balancer"]["id"]
    seen = [(r.method, r.url) for r in recording.requests]
    assert ("POST", "https://api.runpod.io/graphql") in seen
    queue_url = f"https://api.runpod.ai/v2/{queue_id}"
    # square(3) ends within the runsync's wait: one request, no /status polls
    assert [(m, u) for m, u in seen if u.startswith(queue_url)] == [
        ("POST", f"{queue_url}/runsync?wait={RUNSYNC_WAIT_MS}")
    ]
    assert ("POST", f"https://{lb_id}.api.runpod.ai/execute") in seen
    for request in recording.requests:
        assert request.headers["authorization"] == f"Bearer {record.api_key}"
        if "/runsync" in request.url:
            body = request.json()
            assert set(body) <= {"input", "policy"}  # no caller id, no stream flag
            assert "signature" not in body["input"]  # RunPod's workers are not ours


async def test_a_job_that_outlives_the_runsync_wait_is_polled_to_its_end(
    daemon: Daemon,
) -> None:
    async with at_the_cloud_urls(daemon) as (provider, recording):
        async with runtime(provider=provider):
            job = await sleepy(RUNSYNC_WAIT_MS / 1000 + 0.5)
            assert job.output == "woke", job.error
    queue_url = f"https://api.runpod.ai/v2/{provider.endpoints['rp-queue']['id']}"
    sent = [
        (r.method, r.url.removeprefix(queue_url))
        for r in recording.requests
        if r.url.startswith(queue_url)
    ]
    assert sent[0] == ("POST", f"/runsync?wait={RUNSYNC_WAIT_MS}")
    polls = sent[1:]
    assert polls  # the runsync answered when its wait ran out, with the job's id
    assert {(method, path.rsplit("/", 1)[0]) for method, path in polls} == {
        ("GET", "/status")
    }


async def test_undeploy_lists_and_removes_what_it_created(daemon: Daemon) -> None:
    record = daemon.record
    assert record is not None
    async with runtime(provider=provider_for(daemon)):
        await square(2)
    transport = HttpsTransport()
    try:
        control = ControlPlane(transport, record.url, record.api_key)
        created = {e["name"]: e for e in await list_endpoints(control)}
        assert "live-rp-queue" in created
        endpoint_id = created["live-rp-queue"]["id"]
        assert await remove_endpoint(control, endpoint_id)
        assert "live-rp-queue" not in {e["name"] for e in await list_endpoints(control)}
        plane = DataPlane(transport, f"{record.url}/v2", record.api_key)
        with pytest.raises(Exception, match=r"no such endpoint"):
            await plane.health(endpoint_id)
    finally:
        await transport.aclose()
