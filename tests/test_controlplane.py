"""`flash local` as RunPod's GraphQL control plane: the reader, the schema, the daemon.

The requests are the ones RunPod's clients send: the stock ``runpod`` package's own query
builders and calls (inline literals), and the ``variables`` form runpod-flash 1.21 sends
(PROTOCOL.md section 5, captured on the wire).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import runpod
from runpod.api import ctl_commands
from runpod.api.graphql import run_graphql_query
from runpod.api.mutations import (
    endpoints as endpoint_mutations,
    templates as template_mutations,
)
from runpod.api.queries import (
    endpoints as endpoint_queries,
    gpus as gpu_queries,
    user as user_queries,
)

from flash_actors.providers.local.controlplane import ControlPlane
from flash_actors.providers.local.controlplane.language import (
    MAX_DEPTH,
    MAX_DOCUMENT,
    MAX_TOKENS,
    RequestError,
    parse,
    resolve,
    variable_values,
)
from flash_actors.providers.local.controlplane.state import STATE_NAME
from flash_actors.providers.local.daemon.jobs import Job
from flash_actors.providers.local.daemon.record import read_record
from flash_actors.providers.local.daemon.store import JobRecord
from tests._daemon import Daemon, descendants, flash, run_job, wait_gone

FLASH_CPU = "runpod/flash-cpu:py3.12-latest"

# runpod-flash 1.21's live-provisioning mutation and its variables (PROTOCOL.md section 5)
FLASH_SAVE_ENDPOINT = (
    "mutation saveEndpoint($input: EndpointInput!) { saveEndpoint(input: $input) { aiKey "
    "gpuIds id idleTimeout locations name networkVolumeId networkVolumeIds { "
    "networkVolumeId dataCenterId } flashEnvironmentId scalerType scalerValue templateId "
    "type userId version workersMax workersMin workersStandby workersPFBTarget gpuCount "
    "allowedCudaVersions minCudaVersion executionTimeoutMs instanceIds activeBuildid "
    "idePodId flashBootType } }"
)
FLASH_SELECTED = [
    "aiKey",
    "gpuIds",
    "id",
    "idleTimeout",
    "locations",
    "name",
    "networkVolumeId",
    "networkVolumeIds",
    "flashEnvironmentId",
    "scalerType",
    "scalerValue",
    "templateId",
    "type",
    "userId",
    "version",
    "workersMax",
    "workersMin",
    "workersStandby",
    "workersPFBTarget",
    "gpuCount",
    "allowedCudaVersions",
    "minCudaVersion",
    "executionTimeoutMs",
    "instanceIds",
    "activeBuildid",
    "idePodId",
    "flashBootType",
]


def flash_input(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
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
        "flashBootType": "FLASHBOOT",
        "template": {
            "advancedStart": False,
            "config": {},
            "containerDiskInGb": 20,
            "containerRegistryAuthId": "",
            "dockerArgs": "",
            "env": [{"key": "RUNPOD_API_KEY", "value": "secret-key"}],
            "imageName": FLASH_CPU,
            "name": "CpuLiveServerless_abc__PodTemplate_def",
            "ports": "",
            "startScript": "",
        },
    }
    data.update(changes)
    return data


# -- the reader -------------------------------------------------------------------------------


def arguments(source: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    operation = parse(source)
    values = variable_values(operation, variables)
    (field,) = operation.selections
    return {name: resolve(value, values) for name, value in field.arguments}


def test_reads_the_runpod_packages_inline_builders() -> None:
    template = template_mutations.generate_pod_template(
        "tpl",
        FLASH_CPU,
        docker_start_cmd='python -c "print(1)"',
        env={"A": "1", "B": "two words"},
        is_serverless=True,
        ports="8888/http, 22/tcp",
    )
    got = arguments(template)["input"]
    assert got["name"] == "tpl"
    assert got["dockerArgs"] == 'python -c "print(1)"'
    assert got["env"] == [
        {"key": "A", "value": "1"},
        {"key": "B", "value": "two words"},
    ]
    assert got["isServerless"] is True
    assert (
        got["containerRegistryAuthId"] == ""
    )  # written `containerRegistryAuthId : ""`
    endpoint = endpoint_mutations.generate_endpoint_mutation(
        "ep", "tid", flashboot=True, allowed_cuda_versions="12.4", gpu_count=2
    )
    got = arguments(endpoint)["input"]
    assert got["flashBootType"] == "FLASHBOOT"  # an enum literal, read as its name
    assert (got["templateId"], got["gpuIds"], got["gpuCount"]) == (
        "tid",
        "AMPERE_16",
        2,
    )
    assert (got["workersMin"], got["workersMax"], got["idleTimeout"]) == (0, 3, 5)
    update = endpoint_mutations.update_endpoint_template_mutation("e1", "t2")
    assert arguments(update) == {"input": {"templateId": "t2", "endpointId": "e1"}}
    operation = parse(endpoint_queries.QUERY_ENDPOINT)
    assert (operation.kind, operation.name) == ("query", "Query")
    (myself,) = operation.selections
    assert myself.selections is not None
    (endpoints,) = myself.selections
    assert endpoints.selections is not None
    assert [f.name for f in endpoints.selections][:3] == ["aiKey", "gpuIds", "id"]
    gpu = parse(gpu_queries.generate_gpu_query("NVIDIA A40", 2)).selections[0]
    assert gpu.selections is not None
    lowest = next(f for f in gpu.selections if f.name == "lowestPrice")
    assert dict(lowest.arguments) == {"input": {"gpuCount": 2}}
    assert parse(user_queries.QUERY_USER).name == "myself"


def test_reads_the_variables_form_with_defaults() -> None:
    source = (
        'query Q($id: String!, $n: Int = 3, $tags: [String!] = ["a", "b"], $o: Obj) {'
        " x: podTemplate(id: $id) { __typename id } n: thing(n: $n, tags: $tags, o: $o) }"
    )
    operation = parse(source)
    assert [d.type for d in operation.variables] == [
        "String!",
        "Int",
        "[String!]",
        "Obj",
    ]
    values = variable_values(operation, {"id": "t1"})
    assert values == {"id": "t1", "n": 3, "tags": ["a", "b"]}
    first, second = operation.selections
    assert (first.key, first.name) == ("x", "podTemplate")
    assert first.selections is not None
    assert [f.name for f in first.selections] == ["__typename", "id"]
    args = {name: resolve(value, values) for name, value in second.arguments}
    assert args == {"n": 3, "tags": ["a", "b"], "o": None}
    input_ = arguments(FLASH_SAVE_ENDPOINT, {"input": flash_input()})["input"]
    assert input_["template"]["imageName"] == FLASH_CPU


def test_reads_every_kind_of_value() -> None:
    source = '''
    # a comment, then commas that mean nothing
    mutation {
      m(
        s: "tab\\t quote\\" slash\\/ e\\u00e9 smile\\ud83d\\ude00",,,
        b: """
            first
              indented \\""" kept
            last
        """,
        e: "",
        i: -42, f: 1.5e3, g: -0.25, t: true, no: false, nil: null, en: QUEUE_DELAY,
        l: [1, [2, []], {k: "v"}], o: {nested: {deeper: [null]}}
      )
    }
    '''
    got = arguments(source)
    assert got["s"] == 'tab\t quote" slash/ e\u00e9 smile\U0001f600'
    assert got["b"] == 'first\n  indented """ kept\nlast'
    assert got["e"] == ""
    assert (got["i"], got["f"], got["g"]) == (-42, 1500.0, -0.25)
    assert (got["t"], got["no"], got["nil"], got["en"]) == (
        True,
        False,
        None,
        "QUEUE_DELAY",
    )
    assert got["l"] == [1, [2, []], {"k": "v"}]
    assert got["o"] == {"nested": {"deeper": [None]}}
    assert parse("{ a }").kind == "query"  # the shorthand


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{ a { ...F } } fragment F on T { b }", r"^fragments are not supported"),
        ("fragment F on T { b } { a }", r"^fragments are not supported"),
        ("{ a { ... on T { b } } }", r"^fragments are not supported"),
        ("{ a @include(if: true) }", r"^directives \(@include\) are not supported"),
        ("query Q @cached { a }", r"^directives \(@cached\) are not supported"),
        ("subscription { a }", r"^subscriptions are not supported"),
        ("{ a } { b }", r"^the query holds 2 operations"),
        (
            "query Q { a(x: $nope) }",
            r'^Variable "\$nope" is not defined by operation "Q"',
        ),
        ('{ a(s: "open) }', r"^Syntax Error: unterminated or invalid string at line 1"),
        ('{ a(s: "\\ud800") }', r"^Syntax Error: invalid string at line 1, column 8"),
        ('{ a(s: "\\q") }', r"^Syntax Error: unterminated or invalid string"),
        ("{ a(n: 2147483648) }", r"^Int cannot represent non 32-bit signed integer"),
        ("{ a(n: 123abc) }", r"^Syntax Error: invalid number at line 1, column 8"),
        ("{ a(n: 1e999) }", r"^Float cannot represent non numeric value"),
        ("{ a(x: 1, x: 2) }", r'^There can be only one argument named "x"'),
        ("{ a(o: {k: 1, k: 2}) }", r'^There can be only one input field named "k"'),
        (
            "query ($v: Int, $v: Int) { a }",
            r'^There can be only one variable named "\$v"',
        ),
        ("query ($v: Int = $w) { a }", r"^Syntax Error: expected a constant value"),
        ("{ }", r"^Syntax Error: expected a field, found '}'"),
        (
            "{ a",
            r"^Syntax Error: expected a name, found the end of the query at line 1, ",
        ),
        ("", r"^Syntax Error: the query is empty"),
        ("   # only a comment", r"^Syntax Error: the query is empty"),
        ("{ a } }", r"^Syntax Error: expected an operation"),
        ("{ a(x: %) }", r"^Syntax Error: unexpected character '%' at line 1, column 8"),
    ],
)
def test_refuses_what_it_does_not_read(source: str, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        parse(source)


def test_checks_variables_and_the_operation_name() -> None:
    operation = parse("query Q($input: EndpointInput!) { a(input: $input) }")
    with pytest.raises(RequestError, match=r'^Variable "\$input" of required type'):
        variable_values(operation, {})
    with pytest.raises(RequestError, match=r'^Variable "\$input" of required type'):
        variable_values(operation, {"input": None})
    assert variable_values(operation, {"input": {"a": 1}, "extra": 2}) == {
        "input": {"a": 1}
    }
    with pytest.raises(RequestError, match=r'^Unknown operation named "Other"'):
        parse("query Q { a }", "Other")
    assert parse("query Q { a }", "Q").name == "Q"


def test_hostile_documents_are_refused_within_bounds() -> None:
    deep = "{" + "a {" * 5_000 + "b" + "}" * 5_001  # under the token bound
    with pytest.raises(
        RequestError, match=rf"^the query is nested more than {MAX_DEPTH}"
    ):
        parse(deep)
    deep_value = "{ a(x: " + "[" * 9_000 + "]" * 9_000 + ") }"
    with pytest.raises(RequestError, match=r"^the query is nested more than"):
        parse(deep_value)
    deep_object = "{ a(x: " + "{k: " * 4_000 + "1" + "}" * 4_000 + ") }"
    with pytest.raises(RequestError, match=r"^the query is nested more than"):
        parse(deep_object)
    deep_type = "query ($v: " + "[" * 9_000 + "Int" + "]" * 9_000 + ") { a }"
    with pytest.raises(RequestError, match=r"^the query is nested more than"):
        parse(deep_type)
    with pytest.raises(
        RequestError, match=rf"^the query is {MAX_DOCUMENT + 1} characters"
    ):
        parse("{ a }" + " " * (MAX_DOCUMENT - 4))
    with pytest.raises(
        RequestError, match=rf"^the query has more than {MAX_TOKENS} tokens"
    ):
        parse("{ " + "a " * MAX_TOKENS + "}")
    big = 'mutation { a(s: """' + "x\\" * 100_000 + '""") }'  # long, yet one token
    assert arguments(big)["s"] == "x\\" * 100_000


# -- the schema, in process -------------------------------------------------------------------


class Recorder:
    """The daemon's side of `ControlPlane`: what it registered (or refuses, when told to)."""

    def __init__(self) -> None:
        self.registered: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, dict[str, Any] | None]] = []
        self.refuse: str | None = None

    async def __call__(self, endpoint_id: str, config: dict[str, Any] | None) -> None:
        self.calls.append((endpoint_id, config))
        if self.refuse is not None and config is not None:
            raise ValueError(self.refuse)
        if config is None:
            self.registered.pop(endpoint_id, None)
        else:
            self.registered[endpoint_id] = config


async def ask(
    plane: ControlPlane, query: str, variables: dict[str, Any] | None = None
) -> dict[str, Any]:
    status, body = await plane.handle(
        json.dumps({"query": query, "variables": variables}).encode()
    )
    assert status == 200, body
    answer: dict[str, Any] = json.loads(body)
    return answer


def error_of(answer: dict[str, Any]) -> str:
    assert answer["data"] is None, answer
    (error,) = answer["errors"]
    message: str = error["message"]
    return message


async def test_runpod_flash_provisions_updates_and_reloads(tmp_path: Path) -> None:
    recorder = Recorder()
    plane = ControlPlane(tmp_path, recorder)
    answer = await ask(plane, FLASH_SAVE_ENDPOINT, {"input": flash_input()})
    saved = answer["data"]["saveEndpoint"]
    assert list(saved) == FLASH_SELECTED  # every selected field, in order, nothing else
    assert re.fullmatch(r"[a-z0-9]{14}", saved["id"])
    assert saved["name"] == "live-cap-worker"
    assert saved["instanceIds"] == ["cpu3g-2-8"]
    assert (saved["workersMin"], saved["workersMax"], saved["type"]) == (0, 1, "QB")
    assert saved["executionTimeoutMs"] == 0  # echoed as sent: Flash hashes what it sent
    config = recorder.registered[saved["id"]]
    assert config["class"] == "CpuLiveServerless"
    assert config["resource"]["name"] == saved["id"]  # served as /v2/{id}/...
    assert config["resource"]["instanceIds"] == ["cpu3g-2-8"]
    assert (
        config["resource"]["env"] is None
    )  # Flash's own RUNPOD_API_KEY is not passed on

    # saved again with its id: an update that keeps the id and the template
    again = await ask(
        plane,
        FLASH_SAVE_ENDPOINT,
        {"input": flash_input(id=saved["id"], workersMax=2, idleTimeout=30)},
    )
    updated = again["data"]["saveEndpoint"]
    assert (updated["id"], updated["templateId"]) == (saved["id"], saved["templateId"])
    assert (updated["workersMax"], updated["version"]) == (2, 1)
    assert recorder.registered[saved["id"]]["resource"]["workersMax"] == 2
    gpu = await ask(
        plane,
        "mutation S($input: EndpointInput!) { saveEndpoint(input: $input) { id } }",
        {
            "input": flash_input(
                name="live-gpu",
                instanceIds=None,
                gpuIds="AMPERE_16,BLACKWELL_96,-NVIDIA RTX A4000,NVIDIA A40",
                gpuCount=2,
                type="LB",
                template={"name": "g", "imageName": "runpod/flash-lb:py3.12-latest"},
            )
        },
    )
    gpu_config = recorder.registered[gpu["data"]["saveEndpoint"]["id"]]
    assert gpu_config["class"] == "LiveLoadBalancer"
    assert gpu_config["resource"]["gpus"] == ["AMPERE_16", "AMPERE_48"]
    assert gpu_config["resource"]["gpuCount"] == 2

    # Flash's update path: read the template, then save it whole under its id
    get_template = (
        "query getTemplate($id: String!) { podTemplate(id: $id) { id containerDiskInGb "
        "dockerArgs env { key value } imageName name readme } }"
    )
    live = await ask(plane, get_template, {"id": saved["templateId"]})
    assert live["data"]["podTemplate"] == {
        "id": saved["templateId"],
        "containerDiskInGb": 20,
        "dockerArgs": "",
        "env": [{"key": "RUNPOD_API_KEY", "value": "secret-key"}],
        "imageName": FLASH_CPU,
        "name": "CpuLiveServerless_abc__PodTemplate_def",
        "readme": "",
    }
    save_template = (
        "mutation saveTemplate($input: SaveTemplateInput) { saveTemplate(input: $input) "
        "{ id containerDiskInGb dockerArgs env { key value } imageName name readme } }"
    )
    template_input = {
        "id": saved["templateId"],
        "name": "CpuLiveServerless_abc__PodTemplate_def",
        "imageName": FLASH_CPU,
        "containerDiskInGb": 20,
        "dockerArgs": "",
        "env": [{"key": "MODE", "value": "fast"}],
        "readme": "",
        "volumeInGb": 0,
    }
    answer = await ask(plane, save_template, {"input": template_input})
    assert answer["data"]["saveTemplate"]["env"] == [{"key": "MODE", "value": "fast"}]
    assert recorder.registered[saved["id"]]["resource"]["env"] == {"MODE": "fast"}
    assert (await ask(plane, get_template, {"id": "nope"})) == {
        "data": {"podTemplate": None}
    }

    # what the daemon reads back at start, and registers again
    mode = (tmp_path / STATE_NAME).stat().st_mode & 0o777
    assert mode == 0o600
    reloaded = Recorder()
    fresh = ControlPlane(tmp_path, reloaded)
    await fresh.restore()
    assert reloaded.registered == recorder.registered
    listed = await ask(
        fresh,
        "{ myself { endpoints { id name workersMax template { imageName env { key } } } "
        f'one: endpoint(id: "{saved["id"]}") {{ id }} '
        'none: endpoint(id: "x") { id } } }',
    )
    myself = listed["data"]["myself"]
    assert {e["id"] for e in myself["endpoints"]} == set(recorder.registered)
    mine = next(e for e in myself["endpoints"] if e["id"] == saved["id"])
    assert mine["template"] == {"imageName": FLASH_CPU, "env": [{"key": "MODE"}]}
    assert myself["one"] == {"id": saved["id"]}
    assert myself["none"] is None


async def test_stock_queries_answer_availability(tmp_path: Path) -> None:
    plane = ControlPlane(tmp_path, Recorder())
    cpu = (
        "query SecureCpuTypes($cpuFlavorInput: CpuFlavorInput, $specificsInput: "
        "SpecificsInput) { cpuFlavors(input: $cpuFlavorInput) { specifics(input: "
        "$specificsInput) { stockStatus } } }"
    )
    answer = await ask(
        plane,
        cpu,
        {
            "cpuFlavorInput": {"id": "cpu3g"},
            "specificsInput": {"dataCenterId": "", "instanceId": "cpu3g-2-8"},
        },
    )
    assert answer == {"data": {"cpuFlavors": [{"specifics": {"stockStatus": "HIGH"}}]}}
    inline = (
        'query SecureCpuTypes { cpuFlavors(input: {id: "cpu3g"}) { __typename id '
        'specifics(input: {dataCenterId: "", instanceId: "cpu9x-1-1"}) { stockStatus } } }'
    )
    answer = await ask(plane, inline)
    assert answer["data"]["cpuFlavors"] == [
        {"__typename": "CpuFlavor", "id": "cpu3g", "specifics": {"stockStatus": None}}
    ]
    gpu = (
        "query ServerlessGpuTypes($lowestPriceInput: GpuLowestPriceInput, $gpuTypesInput: "
        "GpuTypeFilter) { gpuTypes(input: $gpuTypesInput) { lowestPrice(input: "
        "$lowestPriceInput) { stockStatus } } }"
    )
    variables = {
        "gpuTypesInput": {"ids": ["AMPERE_16"]},
        "lowestPriceInput": {
            "dataCenterId": None,
            "gpuCount": 1,
            "secureCloud": True,
            "includeAiApi": True,
            "allowedCudaVersions": [],
            "compliance": [],
        },
    }
    answer = await ask(plane, gpu, variables)
    assert answer == {"data": {"gpuTypes": [{"lowestPrice": {"stockStatus": "HIGH"}}]}}
    variables["gpuTypesInput"] = {"ids": ["BLACKWELL_96"]}
    assert (await ask(plane, gpu, variables)) == {"data": {"gpuTypes": []}}
    models = await ask(plane, gpu_queries.QUERY_GPU_TYPES)
    assert {"id": "NVIDIA A40", "displayName": "A40", "memoryInGb": 48} in models[
        "data"
    ]["gpuTypes"]


async def test_refusals_change_nothing(tmp_path: Path) -> None:
    recorder = Recorder()
    plane = ControlPlane(tmp_path, recorder)
    save = "mutation S($input: EndpointInput!) { saveEndpoint(input: $input) { id } }"
    cases = [
        (
            flash_input(template={"name": "n", "imageName": "me/app:1"}),
            r"^image 'me/app:1' cannot run on flash local: it runs no containers "
            r"\(there is no Docker here\).*images\.json: \{\"me/app:1\": ",
        ),
        (
            flash_input(bogus=1),
            r'Field "bogus" is not defined by type "EndpointInput"\.$',
        ),
        (
            flash_input(workersMax="2"),
            r'^saveEndpoint\(input\)\.workersMax: Int cannot represent non-integer value: "2"$',
        ),
        (
            flash_input(scalerType="FAST"),
            r'^saveEndpoint\(input\)\.scalerType: Value "FAST" does not exist in "ScalerType"',
        ),
        (flash_input(workersMin=3, workersMax=1), r"workersMin \(3\) is greater than"),
        (
            flash_input(name="../../etc\x00x"),
            r"^saveEndpoint\(input\)\.name holds control",
        ),
        (
            flash_input(instanceIds=["cpu9x-1-1"]),
            r"^instanceIds: unknown CPU instance type",
        ),
        (
            flash_input(
                template={
                    "name": "n",
                    "imageName": FLASH_CPU,
                    "env": [{"key": "LD_PRELOAD", "value": "/x.so"}],
                }
            ),
            r"^template 'n': env LD_PRELOAD would change the code its workers load",
        ),
        (
            flash_input(templateId="t", template=None, id="nope"),
            r'endpoint "nope" not found',
        ),
        (
            flash_input(name="n" * 192),
            r"^saveEndpoint\(input\)\.name is 192 characters long; the limit is 191$",
        ),
    ]
    for data, message in cases:
        assert re.search(message, error_of(await ask(plane, save, {"input": data})))
    # a selection this schema does not have is refused before anything runs
    bad = (
        "mutation S($input: EndpointInput!) { saveEndpoint(input: $input) { id nope } }"
    )
    answer = await ask(plane, bad, {"input": flash_input()})
    assert error_of(answer) == 'Cannot query field "nope" on type "Endpoint".'
    leaf = 'mutation { deleteEndpoint(id: "x") { id } }'
    assert error_of(await ask(plane, leaf)).startswith(
        'Field "deleteEndpoint" must not'
    )
    branch = "{ myself }"
    assert error_of(await ask(plane, branch)).startswith(
        'Field "myself" of type "User" must have a selection of subfields'
    )
    assert error_of(await ask(plane, "{ nope { id } }")) == (
        'Cannot query field "nope" on type "Query".'
    )
    assert error_of(await ask(plane, "mutation { saveEndpoint { id } }")) == (
        'Field "saveEndpoint" argument "input" is required, but it was not provided.'
    )
    # the daemon refusing it: an error, and nothing stored
    recorder.refuse = "no room"
    answer = await ask(plane, save, {"input": flash_input()})
    assert error_of(answer) == "the daemon refused the endpoint: no room"
    assert recorder.registered == {}
    assert not (tmp_path / STATE_NAME).exists()
    assert (await ask(plane, "{ myself { endpoints { id } } }")) == {
        "data": {"myself": {"endpoints": []}}
    }
    # a body that is not a GraphQL request at all: 400
    for body in (b"{nope", b"[]", b'{"query": 1}', b"[" * 100_000 + b"]" * 100_000):
        status, answer_body = await plane.handle(body)
        assert status == 400
        assert json.loads(answer_body)["data"] is None


async def test_templates_deletes_and_mapped_images(tmp_path: Path) -> None:
    recorder = Recorder()
    plane = ControlPlane(tmp_path / ".flash", recorder)
    handler = tmp_path / "handler.py"
    handler.write_text("import runpod\n")
    (tmp_path / ".flash").mkdir()
    (tmp_path / ".flash" / "images.json").write_text(
        json.dumps({"me/app:1": "handler.py"})
    )
    created = await ask(
        plane,
        template_mutations.generate_pod_template(
            "mine", "me/app:1", is_serverless=True
        ),
    )
    template_id = created["data"]["saveTemplate"]["id"]
    duplicate = template_mutations.generate_pod_template("mine", FLASH_CPU)
    assert error_of(await ask(plane, duplicate)).startswith(
        'Template name must be unique: a template named "mine" exists'
    )
    made = await ask(
        plane,
        endpoint_mutations.generate_endpoint_mutation(
            "mapped", template_id, workers_max=1
        ),
    )
    endpoint_id = made["data"]["saveEndpoint"]["id"]
    config = recorder.registered[endpoint_id]
    assert config["class"] == "ServerlessEndpoint"
    assert config["resource"]["handler"] == str(handler)
    # another template for the endpoint, then the first one can go
    other = await ask(
        plane, template_mutations.generate_pod_template("flash", FLASH_CPU)
    )
    other_id = other["data"]["saveTemplate"]["id"]
    in_use = 'mutation { deleteTemplate(templateName: "mine") }'
    assert error_of(await ask(plane, in_use)).startswith(
        f'deleteTemplate: template "mine" is used by endpoint(s) {endpoint_id}'
    )
    switched = await ask(
        plane,
        endpoint_mutations.update_endpoint_template_mutation(endpoint_id, other_id),
    )
    assert switched["data"]["updateEndpointTemplate"] == {
        "id": endpoint_id,
        "templateId": other_id,
    }
    assert recorder.registered[endpoint_id]["class"] == "CpuLiveServerless"
    assert (await ask(plane, in_use)) == {"data": {"deleteTemplate": None}}
    # changing a template's image re-registers the endpoints that run it
    changed = await ask(
        plane,
        "mutation T($input: SaveTemplateInput) { saveTemplate(input: $input) { id } }",
        {
            "input": {
                "id": other_id,
                "imageName": "runpod/flash:py3.12-latest",
                "env": [],
            }
        },
    )
    assert changed["data"]["saveTemplate"] == {"id": other_id}
    assert recorder.registered[endpoint_id]["class"] == "LiveServerless"
    # deleted only once scaled to zero, as on RunPod
    delete = "mutation D($id: String!) { deleteEndpoint(id: $id) }"
    assert error_of(await ask(plane, delete, {"id": endpoint_id})) == (
        f'deleteEndpoint: endpoint "{endpoint_id}" still has workers (workersMin 0, '
        "workersMax 1); set both to 0 with saveEndpoint first, then delete it"
    )
    scale = (
        f'mutation {{ saveEndpoint(input: {{id: "{endpoint_id}", name: "mapped", '
        f'templateId: "{other_id}", workersMin: 0, workersMax: 0}}) {{ id workersMax }} }}'
    )
    assert (await ask(plane, scale))["data"]["saveEndpoint"] == {
        "id": endpoint_id,
        "workersMax": 0,
    }
    assert (await ask(plane, delete, {"id": endpoint_id})) == {
        "data": {"deleteEndpoint": None}
    }
    assert recorder.calls[-1] == (endpoint_id, None)
    assert error_of(await ask(plane, delete, {"id": endpoint_id})) == (
        f'deleteEndpoint: endpoint "{endpoint_id}" not found'
    )


# -- against a real daemon --------------------------------------------------------------------


@pytest.mark.parametrize("status", ["CANCELLED", "FAILED", "TIMED_OUT", "COMPLETED"])
def test_an_ended_job_that_never_ran_has_what_flash_requires(status: str) -> None:
    now = time.time()
    record = JobRecord(
        id="j", endpoint="e", status=status, options="{}", created=now - 2, finished=now
    )
    envelope = Job(record, {}).envelope(b"1")
    assert envelope["delayTime"] in {1999, 2000}
    assert envelope["executionTime"] == 0
    assert envelope["workerId"] == ""
    queued = Job(
        JobRecord(id="q", endpoint="e", status="IN_QUEUE", options="{}", created=now),
        {},
    )
    assert "executionTime" not in queued.envelope()


RUN_ON_ENDPOINT = """
import json, sys
import httpx
from flash_actors.messages import FunctionRequest, FunctionResponse
from flash_actors.serialization import RequestSigner, decode_result, endpoint_key
import msgspec

url, key, endpoint = sys.argv[1:4]
signer = RequestSigner(
    endpoint_key(endpoint),
    FunctionRequest(function_name="add", function_code="def add(a, b):\\n    return a + b\\n"),
)
request = signer.sign([2, 3], {})
answer = httpx.post(
    f"{url}/v2/{endpoint}/runsync",
    json={"input": msgspec.to_builtins(request)},
    headers={"Authorization": f"Bearer {key}"},
    timeout=60,
).json()
output = msgspec.convert(answer["output"], FunctionResponse)
print(json.dumps({
    "status": answer["status"],
    "delayTime": answer.get("delayTime"),
    "executionTime": answer.get("executionTime"),
    "result": decode_result(output.result, output.signature, endpoint_key(endpoint)),
}))
"""


def run_on_endpoint(daemon: Daemon, endpoint_id: str) -> dict[str, Any]:
    assert daemon.record is not None
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            RUN_ON_ENDPOINT,
            daemon.record.url,
            daemon.record.api_key,
            endpoint_id,
        ],
        env={**os.environ, "FLASH_SECRET": daemon.record.secret},
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.slow  # two daemon starts and a worker: ~20 s on a loaded machine
@pytest.mark.timeout(120)
def test_stock_runpod_client_provisions_on_the_daemon(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = Daemon(project / ".flash")
    try:
        assert daemon.record is not None
        monkeypatch.setenv("RUNPOD_API_BASE_URL", daemon.record.url)
        monkeypatch.setattr(runpod, "api_key", daemon.record.api_key)
        template = ctl_commands.create_template(
            "flash-cpu", FLASH_CPU, is_serverless=True, env={"GREETING": "hi"}
        )
        endpoint = ctl_commands.create_endpoint(
            "adder", template["id"], workers_min=1, workers_max=1, flashboot=True
        )
        endpoint_id = endpoint["id"]
        assert re.fullmatch(r"[a-z0-9]{14}", endpoint_id)
        assert endpoint["name"] == "adder"
        with daemon.client() as client:
            health = client.get(f"/v2/{endpoint_id}/health")
            assert health.status_code == 200, health.text
            assert set(health.json()) == {"jobs", "workers"}
            metrics = client.get(f"/v2/{endpoint_id}/metrics").json()
            assert set(metrics["workers"]) == {
                "idle",
                "running",
                "initializing",
                "ready",
                "throttled",
                "unhealthy",
            }
            assert metrics["readyWorkers"] == []
            # it runs as our Flash workers: a Flash request comes back computed
            done = run_on_endpoint(daemon, endpoint_id)
            assert done["status"] == "COMPLETED"
            assert done["result"] == 5
            assert isinstance(done["delayTime"], int)
            assert isinstance(done["executionTime"], int)
            listed = ctl_commands.get_endpoints()
            assert [(e["id"], e["name"], e["templateId"]) for e in listed] == [
                (endpoint_id, "adder", template["id"])
            ]
            assert listed[0]["env"] == [{"key": "GREETING", "value": "hi"}]

            # any other image is refused: there is no Docker here
            other = ctl_commands.create_template("app", "me/app:1", is_serverless=True)
            with pytest.raises(
                runpod.error.QueryError,
                match=r"^image 'me/app:1' cannot run on flash local",
            ):
                ctl_commands.create_endpoint("app", other["id"])

            # the control plane outlives a restart: same id, same endpoint, still served
            daemon.down()
            up = flash("local", "--state-dir", str(daemon.state_dir), "up", cwd=project)
            assert up.returncode == 0, up.stderr
            daemon.record = read_record(daemon.state_dir)
            assert daemon.record is not None
            assert f"  RUNPOD_API_BASE_URL={daemon.record.url}\n" in up.stdout
            monkeypatch.setenv("RUNPOD_API_BASE_URL", daemon.record.url)
        with daemon.client() as client:
            assert [e["id"] for e in ctl_commands.get_endpoints()] == [endpoint_id]
            assert client.get(f"/v2/{endpoint_id}/health").status_code == 200

            # deleted only after scaling to zero; then its workers are gone
            workers = warm_workers(daemon, endpoint_id)
            assert workers
            delete = f'mutation {{ deleteEndpoint(id: "{endpoint_id}") }}'
            with pytest.raises(runpod.error.QueryError, match=r"still has workers"):
                run_graphql_query(delete)
            scale = endpoint_mutations.generate_endpoint_mutation(
                "adder", template["id"], workers_min=0, workers_max=0
            ).replace("input: {", f'input: {{ id: "{endpoint_id}", ', 1)
            assert run_graphql_query(scale)["data"]["saveEndpoint"]["workersMax"] == 0
            # no worker now: a job waits, and once cancelled its status carries both
            # times (runpod-flash's JobOutput requires them)
            queued = run_job(client, endpoint_id, {"function_name": "add"})
            client.post(f"/v2/{endpoint_id}/cancel/{queued}")
            status = client.get(f"/v2/{endpoint_id}/status/{queued}").json()
            assert status["status"] == "CANCELLED"
            assert isinstance(status["delayTime"], int)
            assert isinstance(status["executionTime"], int)
            assert run_graphql_query(delete) == {"data": {"deleteEndpoint": None}}
            assert client.get(f"/v2/{endpoint_id}/health").status_code == 404
            assert ctl_commands.get_endpoints() == []
            assert wait_gone(workers) == []
            # GraphQL needs the API key like every other route
            unauthorized = httpx.post(
                f"{daemon.record.url}/graphql", json={"query": "{ myself { id } }"}
            )
            assert unauthorized.status_code == 401
            assert client.post("/graphql", content=b"{nope").status_code == 400
    finally:
        daemon.stop()


def workers_of_endpoint(daemon: Daemon, endpoint_id: str) -> list[int]:
    """The daemon's processes that write to the endpoint's log folder: its workers."""
    folder = f"{daemon.state_dir.resolve()}/logs/{endpoint_id}/"
    found = []
    for pid in descendants(daemon.pid):
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{pid}/fd")
            if any(os.readlink(fd).startswith(folder) for fd in fds.iterdir()):
                found.append(pid)
    return found


def warm_workers(daemon: Daemon, endpoint_id: str) -> list[int]:
    """The endpoint's workers, once there are some (workersMin keeps one warm)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = workers_of_endpoint(daemon, endpoint_id)
        if found:
            return found
        time.sleep(0.05)
    return []
