"""The RunPod control plane: what provisioning sends, how failures map, where keys come from.

`RecordingTransport` stands in for the RunPod cloud only; `FakeRunPod` answers it from the
documented protocol (PROTOCOL.md sections 4 and 5). `HttpsTransport` is tested against a
real HTTP server on 127.0.0.1, on asyncio and trio.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    GraphQLMutationError,
    GraphQLQueryError,
    NotDeliveredError,
)
from flash_actors.providers.runpod import credentials
from flash_actors.providers.runpod.graphql import SAVE_ENDPOINT, ControlPlane
from flash_actors.providers.runpod.provisioning import (
    endpoint_input,
    ensure_endpoint,
    list_endpoints,
    remove_endpoint,
)
from flash_actors.providers.runpod.transport import (
    HttpsTransport,
    RecordedRequest,
    RecordingTransport,
    Response,
    json_response,
)
from flash_actors.resources import (
    CpuInstanceType,
    CpuLiveLoadBalancer,
    CpuLiveServerless,
    CpuServerlessEndpoint,
    GpuGroup,
    LiveLoadBalancer,
    LiveServerless,
    ServerlessScalerType,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

KEY = "rp-test-key"
API = "https://api.runpod.io"
GRAPHQL = f"{API}/graphql"

# What runpod-flash 1.21 sends in live mode, as produced by its own code
# (`model_dump(exclude=_payload_exclude(), exclude_none=True)` after
# `_inject_runtime_template_vars()`, FLASH_IS_LIVE_PROVISIONING=true); PROTOCOL.md section 5
# shows the CPU one as captured on the wire, hashes elided.
CPU_1_21 = {
    "executionTimeoutMs": 0,
    "idleTimeout": 60,
    "instanceIds": ["cpu3g-2-8"],
    "name": "live-cap-worker",
    "scalerType": "QUEUE_DELAY",
    "scalerValue": 4,
    "type": "QB",
    "workersMax": 1,
    "workersMin": 0,
    "workersPFBTarget": 0,
    "template": {
        "advancedStart": False,
        "config": {},
        "containerDiskInGb": 20,
        "containerRegistryAuthId": "",
        "dockerArgs": "",
        "env": [{"key": "RUNPOD_API_KEY", "value": KEY}],
        "imageName": "runpod/flash-cpu:py3.12-latest",
        "name": "CpuLiveServerless_7626a9387828cc377c451bd43c04a688__PodTemplate_e4c30df7e3f5a3fed8ab05055c2e6fcc",
        "ports": "",
        "startScript": "",
    },
    "flashBootType": "FLASHBOOT",
}
ALL_POOLS = (
    "ADA_24,ADA_32_PRO,ADA_48_PRO,ADA_80_PRO,AMPERE_16,AMPERE_24,AMPERE_48,AMPERE_80,"
    "BLACKWELL_180,BLACKWELL_96,HOPPER_141"
)
GPU_1_21 = {
    "executionTimeoutMs": 0,
    "gpuCount": 1,
    "idleTimeout": 60,
    "minCudaVersion": "12.8",
    "name": "live-gpu-worker",
    "scalerType": "QUEUE_DELAY",
    "scalerValue": 4,
    "type": "QB",
    "workersMax": 1,
    "workersMin": 0,
    "workersPFBTarget": 0,
    "allowedCudaVersions": "",
    "gpuIds": ALL_POOLS,
    "template": {
        "advancedStart": False,
        "config": {},
        "containerDiskInGb": 64,
        "containerRegistryAuthId": "",
        "dockerArgs": "",
        "env": [{"key": "RUNPOD_API_KEY", "value": KEY}],
        "imageName": "runpod/flash:py3.12-latest",
        "name": "LiveServerless_c9e6c25fbbce8e1ea314635a81198bbe__PodTemplate_8bc278143ddbb60d20f8105e97d2d2c7",
        "ports": "",
        "startScript": "",
    },
    "flashBootType": "FLASHBOOT",
}
GPU_FULL_1_21 = {
    "executionTimeoutMs": 120000,
    "gpuCount": 2,
    "idleTimeout": 30,
    "minCudaVersion": "12.8",
    "name": "live-g2",
    "networkVolumeId": "vol1",
    "scalerType": "REQUEST_COUNT",
    "scalerValue": 2,
    "type": "QB",
    "workersMax": 3,
    "workersMin": 1,
    "workersPFBTarget": 0,
    "allowedCudaVersions": "",
    "gpuIds": "ADA_24,AMPERE_80",
    "template": {
        "advancedStart": False,
        "config": {},
        "containerDiskInGb": 64,
        "containerRegistryAuthId": "",
        "dockerArgs": "",
        "env": [
            {"key": "A", "value": "1"},
            {"key": "B", "value": "\u00e9"},
            {"key": "RUNPOD_API_KEY", "value": KEY},
        ],
        "imageName": "runpod/flash:py3.12-latest",
        "name": "LiveServerless_c001d77e9ba6999dd5d3e513a69cf4a4__PodTemplate_a1d621894334c7529e3c87183535a1ec",
        "ports": "",
        "startScript": "",
    },
    "flashBootType": "FLASHBOOT",
}
LB_1_21_DIFFERENCES = {
    "name": "live-lb",
    "scalerType": "REQUEST_COUNT",
    "type": "LB",
    "imageName": "runpod/flash-lb:py3.12-latest",
    "template_name": "LiveLoadBalancer_f9257e97613558679a0472fc69585cc6__PodTemplate_598a10cae12eb55d9e16c07e685d945b",
}
CAPTURED_MUTATION = (
    "mutation saveEndpoint($input: EndpointInput!) { saveEndpoint(input: $input) { aiKey "
    "gpuIds id idleTimeout locations name networkVolumeId networkVolumeIds { networkVolumeId "
    "dataCenterId } flashEnvironmentId scalerType scalerValue templateId type userId version "
    "workersMax workersMin workersStandby workersPFBTarget gpuCount allowedCudaVersions "
    "minCudaVersion executionTimeoutMs instanceIds activeBuildid idePodId flashBootType } }"
)  # PROTOCOL.md section 5, as runpod-flash 1.21 sends it


class FakeRunPod:
    """RunPod's GraphQL control plane as PROTOCOL.md section 4 documents it, in memory.

    ``saveEndpoint`` creates (an inline template becomes a new template) or, with ``id``,
    replaces every field; ``saveTemplate`` with ``id`` updates a template;
    ``deleteEndpoint`` is refused while workersMin or workersMax is not 0; ``myself {
    endpoints }`` lists endpoints with their template.
    """

    def __init__(self) -> None:
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.templates: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def _endpoint_view(self, endpoint: dict[str, Any]) -> dict[str, Any]:
        template = self.templates.get(endpoint.get("templateId", ""))
        return {**endpoint, "template": dict(template) if template else None}

    def __call__(self, request: RecordedRequest) -> Response:
        assert request.method == "POST"
        assert request.url.endswith("/graphql")
        assert request.headers["authorization"] == f"Bearer {KEY}"
        body = request.json()
        query, variables = body["query"], body["variables"]
        if query.startswith("mutation saveEndpoint"):
            endpoint = dict(variables["input"])
            template = endpoint.pop("template", None)
            if template is not None:
                template_id = f"tpl-{next(self._ids)}"
                self.templates[template_id] = {"id": template_id, **template}
                endpoint["templateId"] = template_id
            if "id" not in endpoint:
                endpoint["id"] = f"ep-{next(self._ids)}"
            elif endpoint["id"] not in self.endpoints:
                return json_response({"errors": [{"message": "endpoint not found"}]})
            self.endpoints[endpoint["id"]] = endpoint
            return json_response({"data": {"saveEndpoint": endpoint}})
        if query.startswith("mutation saveTemplate"):
            template = variables["input"]
            self.templates[template["id"]].update(template)
            return json_response(
                {"data": {"saveTemplate": self.templates[template["id"]]}}
            )
        if query.startswith("query myEndpoints"):
            endpoints = [self._endpoint_view(e) for e in self.endpoints.values()]
            return json_response({"data": {"myself": {"endpoints": endpoints}}})
        if query.startswith("mutation deleteEndpoint"):
            found = self.endpoints.get(variables["id"])
            if found is None:
                return json_response({"errors": [{"message": "endpoint not found"}]})
            if found.get("workersMin") or found.get("workersMax"):
                message = "Endpoint has active workers: set workers to 0 first"
                return json_response({"errors": [{"message": message}]})
            del self.endpoints[variables["id"]]
            return json_response({"data": {"deleteEndpoint": None}})
        return json_response({"errors": [{"message": f"unknown operation {query!r}"}]})


def recording(handler: Callable[[RecordedRequest], Response]) -> ControlPlane:
    return ControlPlane(RecordingTransport(handler), API, KEY)


def sent(cp: ControlPlane) -> list[dict[str, Any]]:
    transport = cp.transport
    assert isinstance(transport, RecordingTransport)
    return [r.json() for r in transport.requests]


def assert_same_input(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Field by field, then the key order and the JSON text as a whole."""
    assert set(got) == set(expected)
    for key, value in expected.items():
        if key == "template":
            for field, field_value in value.items():
                assert got["template"][field] == field_value, f"template.{field}"
            assert list(got["template"]) == list(value)
        else:
            assert got[key] == value, key
    assert list(got) == list(expected)
    assert json.dumps(got) == json.dumps(expected)


@pytest.fixture(autouse=True)
def _no_flash_image_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "FLASH_GPU_IMAGE",
        "FLASH_CPU_IMAGE",
        "FLASH_LB_IMAGE",
        "FLASH_CPU_LB_IMAGE",
        "FLASH_IMAGE_TAG",
        "RUNPOD_DEFAULT_LOCATIONS",
        "RUNPOD_DEFAULT_DATACENTER",
    ):
        monkeypatch.delenv(name, raising=False)


# -- what provisioning sends ----------------------------------------------------------------


async def test_cpu_endpoint_is_created_with_runpod_flash_1_21s_mutation() -> None:
    cp = recording(FakeRunPod())
    endpoint = await ensure_endpoint(cp, CpuLiveServerless(name="cap-worker"))
    assert endpoint["id"].startswith("ep-")
    transport = cp.transport
    assert isinstance(transport, RecordingTransport)
    listing, save = transport.requests
    assert listing.json()["query"].startswith(
        "query myEndpoints { myself { endpoints {"
    )
    assert (save.method, save.url) == ("POST", GRAPHQL)
    assert save.headers["authorization"] == f"Bearer {KEY}"
    assert save.headers["content-type"] == "application/json"
    body = save.json()
    assert list(body) == ["query", "variables"]
    assert " ".join(body["query"].split()) == CAPTURED_MUTATION
    assert SAVE_ENDPOINT == CAPTURED_MUTATION
    assert list(body["variables"]) == ["input"]
    assert_same_input(body["variables"]["input"], CPU_1_21)


async def test_gpu_endpoint_is_created_with_runpod_flash_1_21s_mutation() -> None:
    cp = recording(FakeRunPod())
    await ensure_endpoint(cp, LiveServerless(name="gpu-worker"))
    assert " ".join(sent(cp)[1]["query"].split()) == CAPTURED_MUTATION
    assert_same_input(sent(cp)[1]["variables"]["input"], GPU_1_21)


def test_gpu_config_with_every_field_maps_as_runpod_flash_1_21() -> None:
    resource = LiveServerless(
        name="g2",
        gpus=[GpuGroup.AMPERE_80, GpuGroup.ADA_24],
        gpuCount=2,
        workersMin=1,
        workersMax=3,
        idleTimeout=30,
        executionTimeoutMs=120000,
        env={"A": "1", "B": "\u00e9"},
        networkVolumeId="vol1",
        scalerType=ServerlessScalerType.REQUEST_COUNT,
        scalerValue=2,
    )
    assert_same_input(endpoint_input(resource, api_key=KEY), GPU_FULL_1_21)


def test_load_balancer_is_type_lb_on_flashs_lb_image() -> None:
    got = endpoint_input(LiveLoadBalancer(name="lb"), api_key=KEY)
    expected = dict(GPU_1_21, name="live-lb", scalerType="REQUEST_COUNT", type="LB")
    template: dict[str, Any] = GPU_1_21["template"]  # type: ignore[assignment]
    expected["template"] = dict(
        template,
        imageName=LB_1_21_DIFFERENCES["imageName"],
        name=LB_1_21_DIFFERENCES["template_name"],
    )
    assert_same_input(got, expected)


def test_cpu_load_balancer_is_type_lb_on_flashs_cpu_lb_image() -> None:
    got = endpoint_input(
        CpuLiveLoadBalancer(name="clb", instanceIds=[CpuInstanceType.CPU3C_4_8]),
        api_key=KEY,
    )
    expected = dict(
        CPU_1_21,
        instanceIds=["cpu3c-4-8"],
        name="live-clb",
        scalerType="REQUEST_COUNT",
        type="LB",
    )
    template: dict[str, Any] = CPU_1_21["template"]  # type: ignore[assignment]
    expected["template"] = dict(
        template,
        containerDiskInGb=40,  # the cpu3c-4-8 limit
        imageName="runpod/flash-lb-cpu:py3.12-latest",
        name="CpuLiveLoadBalancer_b2808bb215ad6aaf83ef91941ecafaa0__PodTemplate_8da2a76e970637bb8e95a1e0c4622537",
    )
    assert_same_input(got, expected)


def test_flashs_image_variables_override_the_worker_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLASH_IMAGE_TAG", "dev")
    got = endpoint_input(LiveServerless(name="w"))
    assert got["template"]["imageName"] == "runpod/flash:py3.12-dev"
    monkeypatch.setenv("FLASH_CPU_IMAGE", "me/flash-cpu:mine")
    got = endpoint_input(CpuLiveServerless(name="w"))
    assert got["template"]["imageName"] == "me/flash-cpu:mine"
    assert got["template"]["env"] == []  # no api_key given: nothing added


def test_own_runpod_api_key_in_env_is_not_replaced() -> None:
    got = endpoint_input(
        CpuLiveServerless(name="w", env={"RUNPOD_API_KEY": "theirs"}), api_key=KEY
    )
    assert got["template"]["env"] == [{"key": "RUNPOD_API_KEY", "value": "theirs"}]


def test_configs_runpod_cannot_run_are_refused_naming_the_fix() -> None:
    with pytest.raises(
        ConfigurationError,
        match=r"^CpuServerlessEndpoint\(name='x'\): a CpuServerlessEndpoint on RunPod needs its worker image: pass imageName=",
    ):
        endpoint_input(CpuServerlessEndpoint(name="x"))
    with pytest.raises(
        ConfigurationError,
        match=r"^LiveServerless\(name='x'\): idleTimeout must be 1 to 3600 seconds on RunPod, got 0$",
    ):
        endpoint_input(LiveServerless(name="x", idleTimeout=0))


# -- reuse, update, create --------------------------------------------------------------------


async def test_same_config_reuses_the_endpoint_without_a_mutation() -> None:
    fake = FakeRunPod()
    cp = recording(fake)
    first = await ensure_endpoint(cp, CpuLiveServerless(name="w"))
    second = await ensure_endpoint(cp, CpuLiveServerless(name="w"))
    assert second["id"] == first["id"]
    assert [b["query"].split()[1] for b in sent(cp)] == [
        "myEndpoints",
        "saveEndpoint($input:",
        "myEndpoints",
    ]
    assert len(fake.endpoints) == 1


async def test_changed_config_updates_the_endpoint_keeping_its_id() -> None:
    fake = FakeRunPod()
    cp = recording(fake)
    first = await ensure_endpoint(cp, CpuLiveServerless(name="w"))
    template_id = first["templateId"]
    changed = CpuLiveServerless(name="w", workersMax=3, env={"MODE": "fast"})
    second = await ensure_endpoint(cp, changed)
    assert second["id"] == first["id"]
    assert len(fake.endpoints) == 1
    update, template = sent(cp)[3:]
    # what runpod-flash 1.21's `ServerlessResource.update` sends for this change (its own
    # code run with its GraphQL client recording): the endpoint without its template but
    # with its id and templateId, then the template by id
    assert update["query"] == SAVE_ENDPOINT
    assert json.dumps(update["variables"]["input"]) == json.dumps(
        {
            "executionTimeoutMs": 0,
            "idleTimeout": 60,
            "instanceIds": ["cpu3g-2-8"],
            "name": "live-w",
            "scalerType": "QUEUE_DELAY",
            "scalerValue": 4,
            "type": "QB",
            "workersMax": 3,
            "workersMin": 0,
            "workersPFBTarget": 0,
            "flashBootType": "FLASHBOOT",
            "id": first["id"],
            "templateId": template_id,
        }
    )
    assert template["query"].startswith(
        "mutation saveTemplate($input: SaveTemplateInput)"
    )
    assert json.dumps(template["variables"]["input"]) == json.dumps(
        {
            "containerDiskInGb": 20,
            "dockerArgs": "",
            "env": [
                {"key": "MODE", "value": "fast"},
                {"key": "RUNPOD_API_KEY", "value": KEY},
            ],
            "imageName": "runpod/flash-cpu:py3.12-latest",
            "name": "CpuLiveServerless_ffc274b0020441c41c04bfbeac5454e1__PodTemplate_d5498b349ea2579d09e4c4b5934316ca",
            "volumeInGb": 0,
            "id": template_id,
        }
    )
    # now it is the same again: a third call changes nothing
    third = await ensure_endpoint(cp, changed)
    assert third["id"] == first["id"]
    assert len(sent(cp)) == 6


async def test_an_image_change_alone_is_an_update() -> None:
    fake = FakeRunPod()
    cp = recording(fake)
    first = await ensure_endpoint(cp, LiveServerless(name="w"))
    await ensure_endpoint(cp, LiveServerless(name="w", imageName="me/worker:2"))
    assert len(fake.endpoints) == 1
    assert fake.templates[first["templateId"]]["imageName"] == "me/worker:2"


async def test_list_and_remove_the_live_endpoints() -> None:
    fake = FakeRunPod()
    cp = recording(fake)
    fake.endpoints["ep-other"] = {
        "id": "ep-other",
        "name": "someone-elses",
        "workersMax": 2,
    }
    kept = await ensure_endpoint(
        cp, CpuLiveServerless(name="a", workersMin=1, workersMax=2)
    )
    await ensure_endpoint(cp, LiveServerless(name="b"))
    assert sorted(e["name"] for e in await list_endpoints(cp)) == ["live-a", "live-b"]
    before = len(sent(cp))
    assert await remove_endpoint(cp, kept["id"]) is True
    operations = [b["query"].split()[1].split("(")[0] for b in sent(cp)[before:]]
    assert operations == ["myEndpoints", "saveEndpoint", "deleteEndpoint"]
    scale = sent(cp)[before + 1]["variables"]["input"]
    assert (scale["id"], scale["workersMin"], scale["workersMax"]) == (kept["id"], 0, 0)
    assert scale["name"] == "live-a"
    assert scale["templateId"] == kept["templateId"]
    assert sent(cp)[-1]["variables"] == {"id": kept["id"]}
    assert kept["id"] not in fake.endpoints
    assert [e["name"] for e in await list_endpoints(cp)] == ["live-b"]
    assert await remove_endpoint(cp, kept["id"]) is False


# -- errors -------------------------------------------------------------------------------------


async def test_graphql_errors_carry_the_servers_message() -> None:
    cp = recording(
        lambda _: json_response(
            {"errors": [{"message": "name taken"}, {"message": "gpuIds invalid"}]}
        )
    )
    with pytest.raises(
        GraphQLMutationError, match=r"^saveEndpoint failed: name taken; gpuIds invalid$"
    ):
        await cp.save_endpoint({"name": "x"})
    with pytest.raises(
        GraphQLQueryError, match=r"^myEndpoints failed: name taken; gpuIds invalid$"
    ):
        await cp.find_endpoints()
    bad_request = recording(
        lambda _: json_response({"errors": [{"message": "Syntax Error"}]}, status=400)
    )
    with pytest.raises(
        GraphQLMutationError, match=r"^deleteEndpoint failed: Syntax Error$"
    ):
        await bad_request.delete_endpoint("x")


@pytest.mark.parametrize("status", [401, 403])
async def test_a_rejected_key_is_one_line_naming_runpod_api_key(status: int) -> None:
    cp = recording(lambda _: Response(status, b"Unauthorized", {}))
    with pytest.raises(ConfigurationError) as info:
        await ensure_endpoint(cp, LiveServerless(name="w"))
    assert str(info.value) == (
        f"RunPod rejected the API key (HTTP {status} from {GRAPHQL}): check "
        "RUNPOD_API_KEY (environment, .env or ~/.runpod/config.toml)"
    )


async def test_an_unauthorized_graphql_error_is_a_configuration_error() -> None:
    cp = recording(
        lambda _: json_response({"errors": [{"message": "Unauthorized request"}]})
    )
    with pytest.raises(
        ConfigurationError,
        match=r"^RunPod rejected the API key \(Unauthorized request\) at https://api\.runpod\.io/graphql: check RUNPOD_API_KEY",
    ):
        await cp.find_endpoints()


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_throttling_and_server_errors_are_delivery_errors(status: int) -> None:
    cp = recording(lambda _: Response(status, b"<html>busy</html>", {}))
    with pytest.raises(
        DeliveryError,
        match=rf"^saveEndpoint at https://api\.runpod\.io/graphql: RunPod answered HTTP {status} \(HTTP {status}\); retry later$",
    ):
        await cp.save_endpoint({"name": "x"})


async def test_transient_graphql_errors_are_delivery_errors() -> None:
    cp = recording(
        lambda _: json_response({"errors": [{"message": "Please try again later"}]})
    )
    with pytest.raises(
        DeliveryError,
        match=r"^myEndpoints at https://api\.runpod\.io/graphql: Please try again later; retry later$",
    ):
        await cp.find_endpoints()


async def test_an_unreachable_control_plane_is_a_delivery_error() -> None:
    def unreachable(request: RecordedRequest) -> Response:
        msg = "POST https://api.runpod.io/graphql: cannot connect (refused)"
        raise DeliveryError(msg)

    with pytest.raises(
        DeliveryError, match=r"^POST https://api\.runpod\.io/graphql: cannot connect"
    ):
        await ensure_endpoint(recording(unreachable), LiveServerless(name="w"))


# -- credentials and URLs ----------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty HOME and working directory, and none of RunPod's variables set."""
    for name in ("RUNPOD_API_KEY", "RUNPOD_API_BASE_URL", "RUNPOD_ENDPOINT_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "home"
    folder.mkdir()
    monkeypatch.setenv("HOME", str(folder))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return folder


def write_config(home: Path, text: str) -> Path:
    path = home / ".runpod" / "config.toml"
    path.parent.mkdir()
    path.write_text(text)
    return path


def test_the_key_comes_from_the_environment_first(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", " from-env ")
    (home.parent / "work" / ".env").write_text("RUNPOD_API_KEY=from-dotenv\n")
    write_config(home, '[default]\napi_key = "from-config"\n')
    assert credentials.find_api_key() == ("from-env", "environment")
    settings = credentials.load_settings()
    assert settings.api_key == "from-env"
    assert "from-env" not in repr(settings)


def test_the_key_comes_from_dotenv_second(home: Path) -> None:
    dotenv = home.parent / "work" / ".env"
    dotenv.write_text("# local settings\nRUNPOD_API_KEY=from-dotenv\n")
    write_config(home, '[default]\napi_key = "from-config"\n')
    assert credentials.find_api_key() == ("from-dotenv", str(dotenv))


def test_the_key_comes_from_runpods_config_file_third(home: Path) -> None:
    path = write_config(home, '[default]\napi_key = "from-config"\n')
    assert credentials.find_api_key() == ("from-config", str(path))


def test_runpodctls_top_level_key_is_read_without_a_default_profile(home: Path) -> None:
    write_config(
        home, 'apikey = "from-runpodctl"\napiurl = "https://api.runpod.io/graphql"\n'
    )
    assert credentials.find_api_key()[0] == "from-runpodctl"


def test_a_missing_key_names_the_three_places(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "  ")  # blank counts as unset
    with pytest.raises(ConfigurationError) as info:
        credentials.load_settings()
    assert str(info.value) == (
        "no RunPod API key: set RUNPOD_API_KEY in the environment, in a .env file in the "
        f"working directory, or as api_key under [default] in {home}/.runpod/config.toml "
        "(`runpod config`)"
    )


def test_a_broken_config_file_is_named(home: Path) -> None:
    path = write_config(home, "[default\napi_key = \n")
    with pytest.raises(
        ConfigurationError,
        match=rf"^{path} is not valid TOML \(.*\): fix it, or set RUNPOD_API_KEY$",
    ):
        credentials.find_api_key()


def test_urls_default_to_runpods_and_follow_the_variables(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    settings = credentials.load_settings()
    assert settings.graphql_url == "https://api.runpod.io/graphql"
    assert settings.endpoint_base_url == "https://api.runpod.ai/v2"
    monkeypatch.setenv("RUNPOD_API_BASE_URL", "http://127.0.0.1:8765/")
    (home.parent / "work" / ".env").write_text(
        "RUNPOD_ENDPOINT_BASE_URL=http://127.0.0.1:8765/v2\n"
    )
    settings = credentials.load_settings()
    assert settings.graphql_url == "http://127.0.0.1:8765/graphql"
    assert settings.endpoint_base_url == "http://127.0.0.1:8765/v2"


def test_one_url_variable_without_the_other_is_warned_about(
    home: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flash_actors")
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    monkeypatch.setenv("RUNPOD_API_BASE_URL", "http://127.0.0.1:8765")
    credentials.load_settings()
    assert [r.getMessage() for r in caplog.records] == [
        "runpod.urls.partial overridden=RUNPOD_API_BASE_URL "
        "at_default=RUNPOD_ENDPOINT_BASE_URL "
        "hint='set both (RUNPOD_URL_MIXED_OK=1 silences this)'"
    ]
    caplog.clear()
    monkeypatch.setenv("RUNPOD_URL_MIXED_OK", "1")
    credentials.load_settings()
    assert caplog.records == []


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("htps://api.runpod.io", r"is not a valid http or https URL \(scheme='htps'"),
        ("api.runpod.io", r"is not a valid http or https URL \(scheme=''"),
        ("http://", r"is not a valid http or https URL"),
        ("http://127.0.0.1:8o80", r"has a malformed port"),
    ],
)
def test_a_url_typo_is_loud(
    home: Path, monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", KEY)
    monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", value)
    with pytest.raises(
        ConfigurationError, match=rf"^RUNPOD_ENDPOINT_BASE_URL='{value}' {problem}"
    ):
        credentials.load_settings()


# -- HttpsTransport against a real server on 127.0.0.1 --------------------------------------------


@asynccontextmanager
async def http_server(
    answer: Callable[[RecordedRequest], Response | str],
) -> AsyncIterator[tuple[str, list[RecordedRequest], list[int]]]:
    """A small HTTP/1.1 server on 127.0.0.1 (keep-alive), on the test's own event loop.

    ``answer`` returns the `Response`, or ``"close"`` (drop the connection unanswered) or
    ``"hang"`` (never answer). Yields the base URL, the requests and one entry per
    connection.
    """
    requests: list[RecordedRequest] = []
    connections: list[int] = []
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
    base = f"http://127.0.0.1:{port}"

    async def serve(stream: anyio.abc.SocketStream) -> None:
        connections.append(1)
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            while True:
                try:
                    head = await reader.receive_until(b"\r\n\r\n", 65536)
                except (
                    anyio.EndOfStream,
                    anyio.IncompleteRead,
                    anyio.BrokenResourceError,
                ):
                    return
                first, *lines = head.decode().split("\r\n")
                method, target, _ = first.split(" ")
                headers = {}
                for line in lines:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.receive_exactly(length) if length else None
                request = RecordedRequest(method, base + target, body, headers, None)
                requests.append(request)
                response = answer(request)
                if response == "close":
                    return
                if response == "hang":
                    await anyio.sleep_forever()
                assert isinstance(response, Response)
                extra = "".join(f"{k}: {v}\r\n" for k, v in response.headers.items())
                await stream.send(
                    f"HTTP/1.1 {response.status} X\r\nContent-Length: {len(response.body)}\r\n"
                    f"X-Served-By: Test\r\n{extra}\r\n".encode()
                    + response.body
                )

    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, serve)
        try:
            yield base, requests, connections
        finally:
            tg.cancel_scope.cancel()


async def test_https_transport_sends_and_returns_everything_over_one_connection() -> (
    None
):
    def answer(request: RecordedRequest) -> Response:
        status = 500 if request.url.endswith("/fail") else 200
        return Response(
            status, b"echo:" + (request.body or b""), {"Content-Type": "text/plain"}
        )

    transport = HttpsTransport()
    try:
        async with http_server(answer) as (base, requests, connections):
            ok = await transport.request(
                "POST",
                f"{base}/v2/ep/run",
                body=b'{"input": 1}',
                headers={"Authorization": "Bearer k"},
            )
            failed = await transport.request("GET", f"{base}/fail", timeout_s=5)
            assert ok.status == 200
            assert ok.body == b'echo:{"input": 1}'
            assert ok.headers["content-type"] == "text/plain"
            assert ok.headers["x-served-by"] == "Test"
            assert (
                failed.status == 500
            )  # an HTTP error status is an answer, not an exception
            assert failed.body == b"echo:"
            assert requests[0].method == "POST"
            assert requests[0].headers["authorization"] == "Bearer k"
            assert requests[0].headers["user-agent"].startswith("flash-actors/")
            assert " (Python " in requests[0].headers["user-agent"]
            assert len(connections) == 1  # the client is created once and kept alive
    finally:
        await transport.aclose()


async def test_https_transport_sends_what_the_recording_transport_records() -> None:
    """The same `ensure_endpoint` over both transports: the same requests reach RunPod."""
    recorded_fake, served_fake = FakeRunPod(), FakeRunPod()
    recorded = recording(recorded_fake)
    await ensure_endpoint(recorded, LiveServerless(name="same"))
    transport = HttpsTransport()
    try:
        async with http_server(served_fake) as (base, requests, _):
            over_https = ControlPlane(transport, base, KEY)
            await ensure_endpoint(over_https, LiveServerless(name="same"))
    finally:
        await transport.aclose()
    recorded_requests = recorded.transport.requests  # type: ignore[attr-defined]
    assert [(r.method, r.body) for r in requests] == [
        (r.method, r.body) for r in recorded_requests
    ]
    for over_wire, on_record in zip(requests, recorded_requests, strict=True):
        for name, value in on_record.headers.items():
            assert over_wire.headers[name] == value
        assert over_wire.url.endswith("/graphql")


async def test_https_transport_maps_failures_to_delivery_errors_naming_the_host() -> (
    None
):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    transport = HttpsTransport()
    try:
        with pytest.raises(
            DeliveryError,
            match=rf"^GET http://127\.0\.0\.1:{dead_port}/health: cannot connect \(",
        ):
            await transport.request("GET", f"http://127.0.0.1:{dead_port}/health")

        def answer(request: RecordedRequest) -> str:
            return "hang" if request.url.endswith("/slow") else "close"

        async with http_server(answer) as (base, _, _):
            port = base.rsplit(":", 1)[1]
            with pytest.raises(
                DeliveryError,
                match=rf"^GET http://127\.0\.0\.1:{port}/slow: no answer within 0\.2 s$",
            ):
                await transport.request("GET", f"{base}/slow", timeout_s=0.2)
            with pytest.raises(
                DeliveryError,
                match=rf"^POST http://127\.0\.0\.1:{port}/drop: the connection broke \(",
            ):
                await transport.request("POST", f"{base}/drop", body=b"x")
        with pytest.raises(
            ConfigurationError,
            match=r"^GET 'ftp://example\.com/x': need an absolute http:// or https:// URL$",
        ):
            await transport.request("GET", "ftp://example.com/x")
    finally:
        await transport.aclose()


async def test_https_transport_no_free_connection_is_not_delivered() -> None:
    """A request that never got a connection from the pool was not sent: safe to resend."""

    def answer(request: RecordedRequest) -> Response | str:
        return "hang" if request.url.endswith("/held") else Response(200, b"", {})

    transport = HttpsTransport(max_connections=1)
    try:
        async with (
            http_server(answer) as (base, requests, _),
            anyio.create_task_group() as tg,
        ):
            port = base.rsplit(":", 1)[1]
            tg.start_soon(transport.request, "POST", f"{base}/held")
            with anyio.fail_after(10):
                while not requests:  # the one connection is taken
                    await anyio.sleep(0.01)
            with pytest.raises(
                NotDeliveredError,
                match=rf"^POST http://127\.0\.0\.1:{port}/next: no free connection in "
                r"the pool within 0\.2 s$",
            ):
                await transport.request("POST", f"{base}/next", timeout_s=0.2)
            assert len(requests) == 1
            tg.cancel_scope.cancel()
    finally:
        await transport.aclose()
