"""Wire messages: Flash's FunctionRequest/FunctionResponse and the internal Call message.

`FunctionRequest` and `FunctionResponse` keep Flash's field names (PROTOCOL.md section 3) so a
stock Flash worker or client understands ours; the extra fields (`signature`, `error_type`,
`job_id`) are ignored by stock components. Arguments stay opaque here (base64 text, or plain
JSON values in json format): only `flash_actors.serialization` turns them into objects.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from flash_actors.policies import CallPolicy

__all__ = [
    "Call",
    "ExecutionType",
    "FunctionRequest",
    "FunctionResponse",
    "PayloadCall",
    "Route",
    "Routed",
    "SerializationFormat",
    "request_decoder",
    "response_decoder",
    "wire_encoder",
]

# The messages are not tracked by the garbage collector (``gc=False``): they hold strings,
# numbers, and lists and dicts of them (a user's JSON values at most), never anything that
# points back at them, so they cannot be part of a reference cycle. A call in flight holds
# several; untracked, they cost no garbage collection a look (see msgspec's docs on ``gc``).
ExecutionType = Literal["function", "class"]
SerializationFormat = Literal["cloudpickle", "json"]


class FunctionRequest(
    msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False
):
    """One remote invocation, as Flash sends it in a job's ``input``.

    ``args``/``kwargs``/``constructor_*`` are base64 cloudpickle strings, or plain JSON values
    when ``serialization_format`` is ``"json"`` (typed ``Any``, so both formats decode here;
    `flash_actors.serialization` checks that cloudpickle payloads are strings). ``signature``
    is the keyed BLAKE3 MAC (``"v2:"`` and 64 hex digits: the scheme's version, then the MAC)
    over every other field (code, modules, ``dependencies``, ``system_dependencies``,
    options) and the payloads, computed by `flash_actors.serialization.RequestSigner`;
    workers refuse a request without a valid one, and nothing is installed for a request
    before its signature is checked.
    """

    function_name: str | None = None
    function_code: str | None = None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    dependencies: list[str] | None = None
    system_dependencies: list[str] | None = None
    modules: dict[str, str] = {}
    execution_type: ExecutionType = "function"
    class_name: str | None = None
    class_code: str | None = None
    constructor_args: list[Any] = []
    constructor_kwargs: dict[str, Any] = {}
    method_name: str = "__call__"
    instance_id: str | None = None
    create_new_instance: bool = True
    accelerate_downloads: bool = True
    serialization_format: SerializationFormat = "cloudpickle"
    signature: str | None = None
    call_chain: list[str] | None = None
    """Endpoints waiting on this call, outermost first (a nested call's; our addition, not
    signed: it only decides whether a re-entering call is refused, see
    `flash_actors.worker.nested`)."""


class FunctionResponse(
    msgspec.Struct, kw_only=True, omit_defaults=True, frozen=True, gc=False
):
    """The answer to a `FunctionRequest`, as Flash returns it in a job's ``output``.

    On failure ``success`` is false, ``error`` holds the message and the remote traceback, and
    ``error_type`` the exception's ``module.QualName``. ``signature`` authenticates ``result``.
    ``worker_id`` names the worker that ran the call (its ``FLASH_WORKER_ID``; our addition,
    absent from Flash's answers).
    """

    success: bool
    result: str | None = None
    json_result: object | None = None
    error: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    stdout: str | None = None
    instance_id: str | None = None
    instance_info: dict[str, object] | None = None
    signature: str | None = None
    worker_id: str | None = None


class Call(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """The message a remote call becomes: what to run, where, and under which policies.

    It travels caller -> Router -> Endpoint inside this process; only ``request`` goes on
    the wire.
    """

    endpoint: str
    function: str
    request: FunctionRequest
    policy: CallPolicy
    arg_names: tuple[str, ...] = ()
    http_method: str | None = None
    http_path: str | None = None
    stream_to: Any = None
    """For ``f.stream(...)``: the send side of a bounded memory stream for the chunks."""
    key: str = ""
    """The function's ``module:qualname``: the Router looks it up in the manifest."""


class PayloadCall(msgspec.Struct, kw_only=True, frozen=True, gc=False):
    """A dictionary job for a handler endpoint (``await endpoint.run({...})``).

    It takes the same road as a `Call` (caller -> Router -> Endpoint); ``input`` is the
    job's JSON ``input`` as RunPod handlers receive it.
    """

    endpoint: str
    input: Any
    policy: CallPolicy


Routed = Call | PayloadCall
"""What the Router routes: a remote call or a dictionary job."""


class Route(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A load-balancer route a worker serves: method, path, and its function's signed request."""

    method: str
    path: str
    request: FunctionRequest


wire_encoder = msgspec.json.Encoder()
request_decoder = msgspec.json.Decoder(FunctionRequest)
response_decoder = msgspec.json.Decoder(FunctionResponse)
