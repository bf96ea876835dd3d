"""The channel from a local worker back to the process that owns it, for nested calls.

When a remote function running on a worker of the local provider awaits another endpoint's
remote function (`flash_actors.worker.nested`), the call is made by the process that owns the
worker pools (the user's process, where the runtime runs): the worker sends it here, and this
process runs it through its runtime, like any of its own calls.

`NestedListener` listens on 127.0.0.1 (started when the first worker starts) and gives each
worker its address and a token of its own (``FLASH_NESTED_ADDR``, ``FLASH_NESTED_TOKEN`` in
the worker's environment). One connection carries one call: the worker sends a frame
``{token, key, endpoint, payload, chain}`` (``payload``: the pickled arguments), and gets back
one frame: an HMAC-SHA256 of the answer under its token, then the pickled outcome (the value,
or the exception to raise). A connection without a known token gets nothing. A worker can
only name functions that code sent from this process calls (`flash_actors.remote.run_nested`
refuses the rest). The worker closing the connection (its job was cancelled) cancels the call.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
from anyio.streams.buffered import BufferedByteReceiveStream

from flash_actors._logging import get_logger
from flash_actors.errors import DeliveryError, SerializationError
from flash_actors.serialization import dumps, loads

if TYPE_CHECKING:
    from anyio.abc import ByteStream, TaskGroup

__all__ = [
    "ADDR_ENV",
    "TOKEN_ENV",
    "Dispatch",
    "NestedListener",
    "call_owner",
    "owner_address",
]

ADDR_ENV = "FLASH_NESTED_ADDR"
TOKEN_ENV = "FLASH_NESTED_TOKEN"  # noqa: S105 (a variable name)
MAX_FRAME = 1 << 30
_LEN = struct.Struct(">I")

Dispatch = Callable[[str, tuple[Any, ...], dict[str, Any], list[str]], Awaitable[Any]]
"""Runs one nested call: ``(key, args, kwargs, chain) -> answer``."""

log = get_logger(__name__)


class _Ask(msgspec.Struct, frozen=True):
    token: str
    key: str
    endpoint: str
    payload: bytes
    chain: list[str] = []


class _Answer(msgspec.Struct, frozen=True):
    failed: bool
    payload: bytes


_ask_decoder = msgspec.msgpack.Decoder(_Ask)
_answer_decoder = msgspec.msgpack.Decoder(_Answer)
_encoder = msgspec.msgpack.Encoder()


async def _send_frame(stream: ByteStream, data: bytes) -> None:
    await stream.send(_LEN.pack(len(data)) + data)


async def _receive_frame(reader: BufferedByteReceiveStream) -> bytes:
    (size,) = _LEN.unpack(await reader.receive_exactly(_LEN.size))
    if size > MAX_FRAME:
        msg = f"a nested-call frame of {size} bytes is over the limit"
        raise DeliveryError(msg)
    return await reader.receive_exactly(size)


def _mac(token: str, data: bytes) -> bytes:
    return hmac.new(token.encode(), data, hashlib.sha256).digest()


class NestedListener:
    """This process's end of the channel (see the module docstring).

    Args:
        dispatch: runs one call: ``(key, args, kwargs, chain) -> answer``.
    """

    def __init__(self, dispatch: Dispatch) -> None:
        self._dispatch = dispatch
        self._tokens: dict[str, str] = {}  # token -> the endpoint of its worker
        self._address: str | None = None
        self._lock = anyio.Lock()

    async def worker_env(self, tg: TaskGroup, endpoint: str) -> dict[str, str]:
        """The environment a new worker of ``endpoint`` needs to call back here."""
        if self._address is None:
            async with self._lock:
                if self._address is None:
                    listener = await anyio.create_tcp_listener(
                        local_host="127.0.0.1", local_port=0
                    )
                    port = listener.extra(anyio.abc.SocketAttribute.local_port)  # noqa: S610
                    tg.start_soon(self._serve, listener)
                    self._address = f"127.0.0.1:{port}"
        token = secrets.token_hex(16)
        self._tokens[token] = endpoint
        return {ADDR_ENV: self._address, TOKEN_ENV: token}

    async def _serve(self, listener: anyio.abc.Listener[ByteStream]) -> None:
        async with listener:  # closed when the provider stops
            await listener.serve(self._handle)

    async def _handle(self, stream: ByteStream) -> None:
        async with stream:
            reader = BufferedByteReceiveStream(stream)
            try:
                ask = _ask_decoder.decode(await _receive_frame(reader))
            except (anyio.IncompleteRead, anyio.BrokenResourceError, DeliveryError):
                return
            except msgspec.DecodeError:
                return
            if self._tokens.get(ask.token) is None:
                log.warning("nested.refused", reason="unknown token")
                return
            answer = await self._run(ask, reader)
            if answer is None:
                return  # the worker hung up: the call was cancelled
            data = _encoder.encode(answer)
            with contextlib.suppress(
                anyio.BrokenResourceError, anyio.ClosedResourceError
            ):  # the worker hung up just now
                await _send_frame(stream, _mac(ask.token, data) + data)

    async def _run(
        self, ask: _Ask, reader: BufferedByteReceiveStream
    ) -> _Answer | None:
        """Run the call; None when the worker hung up first (the call is cancelled)."""
        answer: _Answer | None = None

        async def watch(scope: anyio.CancelScope) -> None:
            with contextlib.suppress(Exception):  # EOF or a reset: the worker is gone
                await reader.receive()
            scope.cancel()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch, tg.cancel_scope)
            try:
                args, kwargs = loads(ask.payload, what="the nested call's arguments")
                value = await self._dispatch(ask.key, args, kwargs, ask.chain)
                answer = _Answer(failed=False, payload=_pack(value))
            except Exception as exc:  # noqa: BLE001 (the error is the answer)
                answer = _Answer(failed=True, payload=_pack(exc))
            tg.cancel_scope.cancel()
        return answer


def _pack(value: Any) -> bytes:
    try:
        return dumps(value, what="the nested call's answer")
    except SerializationError as exc:
        return dumps(exc)


def owner_address() -> tuple[str, str] | None:
    """This worker's way back to the process that owns it: address and token, or None."""
    address = os.environ.get(ADDR_ENV)
    token = os.environ.get(TOKEN_ENV)
    if not address or not token:
        return None
    return address, token


async def call_owner(
    owner: tuple[str, str],
    key: str,
    endpoint: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    chain: list[str],
) -> Any:
    """Make the call ``key(*args, **kwargs)`` through the owning process; its answer.

    Raises:
        DeliveryError: the owner cannot be reached, or its answer is not authentic.
        Exception: the error the call raised there.
    """
    address, token = owner
    host, _, port = address.rpartition(":")
    payload = dumps((args, kwargs), what=f"the arguments of {key}")
    ask = _encoder.encode(
        _Ask(token=token, key=key, endpoint=endpoint, payload=payload, chain=chain)
    )
    try:
        stream = await anyio.connect_tcp(host, int(port))
    except OSError as exc:
        msg = f"cannot reach the process that owns this worker at {address} ({exc})"
        raise DeliveryError(msg) from exc
    async with stream:
        reader = BufferedByteReceiveStream(stream)
        try:
            await _send_frame(stream, ask)
            frame = await _receive_frame(reader)
        except (anyio.IncompleteRead, anyio.BrokenResourceError) as exc:
            msg = f"the process that owns this worker closed the call to {key}"
            raise DeliveryError(msg) from exc
    mac, data = frame[:32], frame[32:]
    if not hmac.compare_digest(mac, _mac(token, data)):
        msg = f"the answer to the nested call of {key} is not authentic"
        raise DeliveryError(msg)
    answer = _answer_decoder.decode(data)
    value = loads(answer.payload, what=f"the answer of {key}")
    if answer.failed and isinstance(value, BaseException):
        raise value
    return value
