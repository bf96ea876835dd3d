"""The local daemon signs the Flash requests that holders of its API key send unsigned.

A stock client (the ``runpod`` package, an unmodified runpod-flash program) sends a Flash
``FunctionRequest`` without our ``signature``: it has the daemon's API key, never its master
secret. The daemon checked that key before the request got here, so the key is the authority:
whoever holds it may run code on the daemon's flash endpoints, exactly as on RunPod. The daemon
then signs the request with the endpoint's key (`flash_actors.serialization.sign_request`), and
its workers keep their rule: they never unpickle or run a request whose signature does not hold.

A request that already carries a signature is stored as sent: the worker checks it, and a bad
one fails the job once with the signature error (a refusal is final, not retried). Input that
is not a valid Flash ``FunctionRequest`` is refused before it is queued, with a message naming
the field (the daemon answers HTTP 400).
"""

from __future__ import annotations

import msgspec

from flash_actors.errors import ManifestError, SerializationError
from flash_actors.messages import FunctionRequest, request_decoder, wire_encoder
from flash_actors.serialization import endpoint_key, sign_request, to_json

__all__ = ["sign_deployed_input", "sign_for_workers"]


def _refuse(problem: str) -> SerializationError:
    return SerializationError(f"input is not a Flash FunctionRequest: {problem}")


def _check(request: FunctionRequest) -> None:
    """What a worker needs before it can run the request (Flash's own validation and more)."""
    if request.execution_type == "function" and not request.function_name:
        raise _refuse('function_name is required when execution_type is "function"')
    if request.execution_type == "class" and not request.class_name:
        raise _refuse('class_name is required when execution_type is "class"')
    payloads = (
        ("args", request.args),
        ("kwargs", request.kwargs),
        ("constructor_args", request.constructor_args),
        ("constructor_kwargs", request.constructor_kwargs),
    )
    if request.serialization_format == "json":
        for field, values in payloads:
            # Plain JSON already; this refuses integers the workers' wire cannot carry.
            try:
                to_json(values, what=f"`{field}`")
            except SerializationError as exc:
                raise _refuse(str(exc)) from None
        return
    for field, values in payloads:
        items = values.items() if isinstance(values, dict) else enumerate(values)
        for name, value in items:
            if not isinstance(value, str):
                raise _refuse(
                    f"`{field}[{name!r}]` is of type {type(value).__name__}, not a base64 "
                    'cloudpickle string (plain JSON values need serialization_format "json")'
                )


def sign_for_workers(
    raw_input: bytes | memoryview, endpoint: str
) -> bytes | memoryview:
    """A flash endpoint's job ``input``, checked, and signed for its workers if unsigned.

    Args:
        raw_input: the job's ``input`` as JSON (from a client the daemon has authenticated).
        endpoint: the endpoint's name; its key (`endpoint_key`) signs the request.

    Returns:
        ``raw_input`` itself when it carries a signature, else the signed request as JSON.

    Raises:
        SerializationError: the input is not a valid Flash ``FunctionRequest``; the message
            names the field.
    """
    try:
        request = request_decoder.decode(raw_input)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _refuse(str(exc)) from exc
    _check(request)
    if request.signature:
        return raw_input
    try:
        signed = sign_request(request, endpoint_key(endpoint))
    except SerializationError as exc:
        raise _refuse(str(exc)) from exc
    return wire_encoder.encode(signed)


def sign_deployed_input(
    raw_input: bytes | memoryview, endpoint: str
) -> tuple[bytes | memoryview, bool]:
    """A deployed endpoint's job ``input``, checked and signed for its workers.

    A signed ``FunctionRequest`` (the app's own calls, `flash_actors.providers.deployed`) is
    checked as `sign_for_workers` checks it; anything else is Flash's deployed-mode JSON,
    carried to the workers in a signed `flash_actors.deployed.handler.deployed_request`.
    Code (``function_code``, ``class_code``) is refused: a deployed endpoint runs only the
    code built into it.

    Returns:
        The input to queue, and whether it is deployed-mode JSON (whose job output is then
        the function's value, not a ``FunctionResponse``).

    Raises:
        ManifestError: the input carries code.
        SerializationError: it is not a JSON object, or not a valid signed request.
    """
    from flash_actors.deployed.handler import deployed_request, refusal

    try:
        decoded = msgspec.json.decode(raw_input)
    except (msgspec.DecodeError, RecursionError) as exc:
        msg = f"input is not JSON: {exc}"
        raise SerializationError(msg) from exc
    if not isinstance(decoded, dict):
        msg = (
            "a deployed endpoint's input is a JSON object keyed by parameter name, e.g. "
            f'{{"input": {{"a": 1}}}}; got {type(decoded).__name__}'
        )
        raise SerializationError(msg)
    why = refusal(decoded, endpoint)
    if why is not None:
        raise ManifestError(why)
    if "signature" in decoded:
        return sign_for_workers(raw_input, endpoint), False
    request = wire_encoder.encode(deployed_request(decoded))
    return sign_for_workers(request, endpoint), True
