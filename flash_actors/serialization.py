"""The only module that pickles: base64 cloudpickle payloads, signed with keyed BLAKE3.

Arguments travel as Flash sends them (PROTOCOL.md section 3): each one a base64 string of its
cloudpickle. cloudpickle runs code when it loads, and a request's ``function_code`` is executed
by the worker, so every request carries ``signature``: a keyed BLAKE3 MAC under the endpoint's
key over every field that decides what runs (the code, the modules, the ``dependencies`` and
``system_dependencies`` to install, the options) and the raw pickles (not their base64 text).
`decode_request` checks it before unpickling anything and raises `PayloadSignatureError` for a
request that is unsigned or was changed on the way; `verify_request` checks it alone (before
installing a request's dependencies). Results are signed the same way by the worker and
checked by the caller.

One signature scheme is spoken, named by a version in every signature: ``"v2:"`` and 64 hex
digits (keyed BLAKE3, 256-bit keys), the version also being the first thing the MAC absorbs.
A signature of another scheme is refused with a message naming both versions (the 64 bare hex
digits of HMAC-SHA256, version 1, come from a flash-actors older than this scheme), never
mistaken for a forgery or accepted.

Flash's other format, ``serialization_format: "json"``, carries plain JSON values instead of
pickles and answers with ``json_result``: nothing on that path is pickled or unpickled. The
signature covers those values too (each one as its canonical JSON: keys sorted), so a
request is signed the same way whatever its format. `sign_request` signs a request that
arrives unsigned from a holder of the API key (the local daemon does it for its workers).

Keys: each endpoint has its own, derived from a master secret with `endpoint_key` (BLAKE3's
key derivation mode). The master secret comes from ``FLASH_SECRET`` (hex) when set,
otherwise it is random per process; the local provider hands each worker its endpoint's key,
never the master secret.

Copies are kept to a minimum: an argument is pickled once, hashed in place and base64-encoded
once (pybase64, GB/s; a large one is encoded on a helper thread while this one hashes it, both
with the GIL released), and decoding validates the base64 in the same pass that decodes it.
"""

from __future__ import annotations

import hmac
import io
import math
import os
import pickle
import pickletools
import secrets
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import cloudpickle
import msgspec
import pybase64
from blake3 import blake3

from flash_actors._memory import tune_allocator
from flash_actors.errors import (
    ConfigurationError,
    PayloadSignatureError,
    ResultTypeUnavailableError,
    SerializationError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from flash_actors.messages import FunctionRequest

__all__ = [
    "SIGNATURE_VERSION",
    "DecodedRequest",
    "RequestSigner",
    "decode_request",
    "decode_result",
    "decode_value",
    "derive_key",
    "dumps",
    "encode_result",
    "encode_value",
    "endpoint_key",
    "loads",
    "master_secret",
    "secret_key",
    "set_master_secret",
    "sign_request",
    "to_json",
    "verify_request",
]

tune_allocator()

_LEN = struct.Struct(">Q")
_PROTOCOL = 5

SIGNATURE_VERSION = 2
"""The signature scheme this module speaks: keyed BLAKE3 (see the module docstring)."""
_SCHEMES = {1: "HMAC-SHA256", 2: "keyed BLAKE3"}
_TAG = f"v{SIGNATURE_VERSION}:"
_SIGNATURE_LEN = len(_TAG) + 64
_KEY_SIZE = 32
_KDF_CONTEXT = "flash-actors 2026-12-02 endpoint MAC key (signature scheme v2)"
"""BLAKE3 ``derive_key`` context: a fixed, application-unique string, as BLAKE3 asks."""

_master_secret: bytes | None = None
_endpoint_keys: dict[str, bytes] = {}


def master_secret() -> bytes:
    """This process's master secret: ``FLASH_SECRET`` (hex) when set, else random.

    Providers that run endpoints elsewhere own their secret (a ``flash local`` daemon's
    comes from its record, RunPod's endpoints are not signed); this one signs what this
    process's own workers (the in-process and local providers) run.
    """
    global _master_secret
    if _master_secret is None:
        env = os.environ.get("FLASH_SECRET")
        if env:
            try:
                _master_secret = bytes.fromhex(env)
            except ValueError as exc:
                msg = "FLASH_SECRET must be a hex string (for example `openssl rand -hex 32`)"
                raise SerializationError(msg) from exc
        else:
            _master_secret = secrets.token_bytes(32)
    return _master_secret


def set_master_secret(secret: bytes) -> None:
    """Replace the master secret (a daemon shares one with its clients); clears derived keys."""
    global _master_secret
    if len(secret) < 16:
        msg = "the master secret must be at least 16 bytes"
        raise SerializationError(msg)
    _master_secret = secret
    _endpoint_keys.clear()


def endpoint_key(endpoint: str) -> bytes:
    """The MAC key of one endpoint, derived from this process's master secret and its name."""
    key = _endpoint_keys.get(endpoint)
    if key is None:
        key = _endpoint_keys[endpoint] = derive_key(master_secret(), endpoint)
    return key


def derive_key(secret: bytes, endpoint: str) -> bytes:
    """The 32-byte MAC key of endpoint ``endpoint`` under master secret ``secret``.

    BLAKE3 in key derivation mode over the secret (length-prefixed) and the endpoint's name.
    """
    material = _LEN.pack(len(secret)) + secret + endpoint.encode()
    return blake3(material, derive_key_context=_KDF_CONTEXT).digest()


def secret_key(secret: str, endpoint: str, *, named: str = "FLASH_SECRET") -> bytes:
    """The MAC key of ``endpoint`` under the hex master secret ``secret`` (`derive_key`).

    Raises:
        ConfigurationError: ``secret`` is not hex; the message names where it came from.
    """
    try:
        raw = bytes.fromhex(secret)
    except ValueError:
        msg = f"{named} must be a hex string (for example `openssl rand -hex 32`)"
        raise ConfigurationError(msg) from None
    return derive_key(raw, endpoint)


class _NotPlain(Exception):
    """Raised by `_PlainPickler` at the first object that is not plain built-in data."""


class _PlainPickler(pickle.Pickler):
    """Pickles plain built-in data only; anything else raises `_NotPlain`.

    Plain: None, bool, int, float, str, bytes, bytearray and exact lists, tuples, dicts and
    sets of those.

    The C pickler saves those exact types before it consults ``reducer_override``, exactly
    as cloudpickle's pickler (the same C code) does, so the bytes are cloudpickle's own; it
    only skips cloudpickle's per-call set-up (~1.5 us of a 6 us small pickle). Every other
    object (functions, classes, instances, subclasses) reaches ``reducer_override`` and the
    value goes to cloudpickle instead.
    """

    def reducer_override(self, obj: Any) -> Any:
        raise _NotPlain


def _describe(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()


_ATOMS = frozenset({int, float, bool, type(None), str, bytes})


def dumps(obj: Any, *, what: str | Callable[[], str] = "value") -> bytes:
    """Cloudpickle ``obj``; `SerializationError` names ``what`` when it cannot be pickled.

    ``what`` may be a function that builds the name, called only on failure.
    """
    if type(obj) in _ATOMS:
        # One C call: the same pickler, so the same bytes as below (and as cloudpickle's)
        return pickle.dumps(obj, _PROTOCOL)
    buffer = io.BytesIO()
    try:
        _PlainPickler(buffer, _PROTOCOL).dump(obj)
    except Exception:  # noqa: BLE001, S110 (_NotPlain; cloudpickle below reports real errors)
        pass
    else:
        return buffer.getvalue()
    try:
        return cloudpickle.dumps(obj, protocol=_PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        name = _describe(what)
        msg = f"cannot serialize {name} ({type(obj).__name__}) with cloudpickle: {exc}"
        raise SerializationError(msg) from exc


def loads(data: bytes | memoryview, *, what: str = "value") -> Any:
    """Unpickle trusted bytes (callers check the signature first)."""
    try:
        return cloudpickle.loads(data)
    except Exception as exc:
        msg = f"cannot deserialize {what}: {type(exc).__name__}: {exc}"
        raise SerializationError(msg) from exc


def _b64encode(raw: bytes) -> str:
    # Straight into a str: encoding to bytes and decoding those copies the text once more.
    return pybase64.b64encode_as_string(raw)


def _b64decode(text: Any, what: str) -> bytes:
    try:
        return pybase64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        if not isinstance(text, str):
            msg = (
                f"{what} is of type {type(text).__name__}, not a base64 cloudpickle string "
                '(plain JSON values need serialization_format "json")'
            )
        else:
            msg = f"{what} is not valid base64: {exc}"
        raise SerializationError(msg) from exc


def encode_value(obj: Any, *, what: str = "value") -> str:
    """One unsigned base64 cloudpickle string (Flash's ``serialize_arg``)."""
    return _b64encode(dumps(obj, what=what))


def decode_value(text: str, *, what: str = "value") -> Any:
    """Inverse of `encode_value`, for payloads that need no authentication (tests, tools)."""
    return loads(_b64decode(text, what), what=what)


def _frame(mac: Any, tag: bytes, data: bytes | str | None) -> None:
    """Feed one length-prefixed field to the MAC so that fields cannot shift into each other."""
    if data is None:
        mac.update(tag + b"\xff")
        return
    raw = data.encode() if isinstance(data, str) else data
    mac.update(tag + _LEN.pack(len(raw)))
    mac.update(raw)


class _NoMac:
    """The MAC of an unsigned request (a provider whose endpoints do not check signatures)."""

    __slots__ = ()

    def update(self, data: object) -> None:
        """Nothing to absorb."""

    def copy(self) -> _NoMac:
        return self


_NO_MAC = _NoMac()


def _new_mac(key: bytes, domain: bytes) -> Any:
    """A keyed BLAKE3 hasher that has absorbed the scheme's version and ``domain``.

    Raises:
        SerializationError: ``key`` is not 32 bytes.
    """
    if len(key) != _KEY_SIZE:
        msg = (
            f"a signing key is {_KEY_SIZE} bytes (endpoint_key and derive_key make one), "
            f"not {len(key)}"
        )
        raise SerializationError(msg)
    return blake3(_TAG.encode() + domain + b"\x00", key=key)


def _signature(mac: Any) -> str | None:
    """The signature text of a finished MAC: the scheme's tag and 64 hex digits."""
    return None if mac is _NO_MAC else _TAG + mac.hexdigest()


def _absorb(mac: Any, raw: bytes) -> None:
    """Feed one length-prefixed payload to the MAC."""
    size = len(raw)
    if size < 4096:
        mac.update(_LEN.pack(size) + raw)
    else:
        mac.update(_LEN.pack(size))
        mac.update(raw)


_PARALLEL_MIN = 1 << 20
"""From this size up, a payload is base64-encoded on a helper thread while this thread hashes
it: both release the GIL, so with a free core the encode costs the longer of the two."""

_helper: ThreadPoolExecutor | None = None
_helper_pid = 0


def _helper_pool() -> ThreadPoolExecutor:
    """This process's helper thread (a forked child starts its own: threads do not fork)."""
    global _helper, _helper_pid
    if _helper is None or _helper_pid != os.getpid():
        _helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flash-b64")
        _helper_pid = os.getpid()
    return _helper


def _absorb_encode(mac: Any, raw: bytes) -> str:
    """Feed one payload to the MAC (`_absorb`) and return its base64 text."""
    if mac is _NO_MAC or len(raw) < _PARALLEL_MIN:
        _absorb(mac, raw)
        return _b64encode(raw)
    text = _helper_pool().submit(_b64encode, raw)
    _absorb(mac, raw)
    return text.result()


class RequestSigner:
    """Builds signed `FunctionRequest`s for one function or class method of one endpoint.

    The static part of the request (names, code) is hashed once, here; each call then only
    pickles, hashes and encodes its arguments.

    Args:
        key: the endpoint's MAC key (`endpoint_key`); ``None`` builds unsigned requests, for
            providers whose workers do not check signatures (stock Flash workers on RunPod).
        template: the request's static fields; its ``args``/``kwargs`` are ignored.
    """

    __slots__ = ("_call_prefix", "_prefix", "template")

    def __init__(self, key: bytes | None, template: FunctionRequest) -> None:
        if template.serialization_format != "cloudpickle":
            msg = (
                "RequestSigner pickles its arguments: its template needs "
                'serialization_format "cloudpickle" (a json-format request is signed '
                "with sign_request)"
            )
            raise SerializationError(msg)
        self.template = template
        mac: Any = _NO_MAC if key is None else _new_mac(key, b"request")
        _static_fields(mac, template)
        self._prefix = mac
        # The common call (default method, no instance, new instance) hashed once too.
        call = mac.copy()
        _frame(call, b"m", template.method_name)
        _frame(call, b"i", None)
        call.update(b"n")
        self._call_prefix = call

    def sign(
        self,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        *,
        constructor_args: Sequence[Any] = (),
        constructor_kwargs: Mapping[str, Any] | None = None,
        instance_id: str | None = None,
        create_new_instance: bool = True,
        method_name: str | None = None,
        arg_names: Sequence[str] = (),
    ) -> FunctionRequest:
        """Pickle, sign and encode one call's arguments into a complete request.

        Raises:
            SerializationError: an argument cannot be pickled; the message names it.
        """
        if method_name is None and instance_id is None and create_new_instance:
            mac = self._call_prefix.copy()
        else:
            mac = self._prefix.copy()
            _frame(mac, b"m", method_name or self.template.method_name)
            _frame(mac, b"i", instance_id)
            mac.update(b"n" if create_new_instance else b"o")
        enc_args = _encode_seq(mac, b"a", args, arg_names)
        enc_kwargs: dict[str, str] = {}
        enc_cargs: list[str] = []
        enc_ckwargs: dict[str, str] = {}
        if constructor_args or constructor_kwargs:
            enc_kwargs = _encode_map(mac, b"k", kwargs)
            enc_cargs = _encode_seq(mac, b"c", constructor_args, ())
            enc_ckwargs = _encode_map(mac, b"d", constructor_kwargs or {})
        elif kwargs:
            enc_kwargs = _encode_map(mac, b"k", kwargs)
            mac.update(_NO_CONSTRUCTOR)
        else:  # the bytes `_encode_map` and `_encode_seq` absorb for none, in one update
            mac.update(_NO_KWARGS_NO_CONSTRUCTOR)
        fields: dict[str, Any] = {
            "args": enc_args,
            "kwargs": enc_kwargs,
            "constructor_args": enc_cargs,
            "constructor_kwargs": enc_ckwargs,
            "instance_id": instance_id,
            "create_new_instance": create_new_instance,
            "signature": _signature(mac),
        }
        if method_name is not None:
            fields["method_name"] = method_name
        return _replace(self.template, fields)


def _replace(template: FunctionRequest, fields: dict[str, Any]) -> FunctionRequest:
    return msgspec.structs.replace(template, **fields)


def _static_fields(mac: Any, req: FunctionRequest) -> None:
    """Feed every field but the call's own (arguments, method, instance) to the MAC.

    That is everything that decides what runs: the code, the modules, the packages installed
    before it (``dependencies``, ``system_dependencies``, as sent: order and spelling
    included) and the options. A field added to `FunctionRequest` that changes what runs
    belongs here, and in `_static_prefix`'s cache key.
    """
    _frame(mac, b"N", req.function_name)
    _frame(mac, b"F", req.function_code)
    _frame(mac, b"E", req.execution_type)
    _frame(mac, b"C", req.class_name)
    _frame(mac, b"K", req.class_code)
    for path in sorted(req.modules):
        _frame(mac, b"P", path)
        _frame(mac, b"S", req.modules[path])
    _frame(mac, b"Z", req.serialization_format)
    _frame_list(mac, b"D", req.dependencies)
    _frame_list(mac, b"Y", req.system_dependencies)
    mac.update(b"A1" if req.accelerate_downloads else b"A0")


def _frame_list(mac: Any, tag: bytes, items: list[str] | None) -> None:
    """A list of strings as its length and each item framed (``None`` differs from ``[]``)."""
    if items is None:
        mac.update(tag + b"\xff")
        return
    mac.update(tag + _LEN.pack(len(items)))
    for item in items:
        _frame(mac, b"=", item)


_NO_CONSTRUCTOR = b"c" + _LEN.pack(0) + b"d" + _LEN.pack(0)
"""What the MAC absorbs for a call without constructor arguments (see `_encode_seq`)."""
_NO_KWARGS_NO_CONSTRUCTOR = b"k" + _LEN.pack(0) + _NO_CONSTRUCTOR
"""... and without keyword arguments either."""


def _arg_name(names: Sequence[str], i: int) -> Callable[[], str]:
    return lambda: (
        f"argument {names[i]!r}" if i < len(names) else f"positional argument {i}"
    )


def _encode_seq(
    mac: Any, tag: bytes, values: Sequence[Any], names: Sequence[str]
) -> list[str]:
    out: list[str] = []
    mac.update(tag + _LEN.pack(len(values)))
    for i, value in enumerate(values):
        raw = dumps(value, what=_arg_name(names, i))
        out.append(_absorb_encode(mac, raw))
    return out


def _encode_map(mac: Any, tag: bytes, values: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    mac.update(tag + _LEN.pack(len(values)))
    if not values:
        return out
    for name in sorted(values):
        raw = dumps(values[name], what=f"argument {name!r}")
        _frame(mac, b"=", name)
        out[name] = _absorb_encode(mac, raw)
    return out


class DecodedRequest:
    """The objects of an authenticated request (only built by `decode_request`)."""

    __slots__ = ("args", "constructor_args", "constructor_kwargs", "kwargs")

    def __init__(
        self,
        args: list[Any],
        kwargs: dict[str, Any],
        constructor_args: list[Any],
        constructor_kwargs: dict[str, Any],
    ) -> None:
        self.args = args
        self.kwargs = kwargs
        self.constructor_args = constructor_args
        self.constructor_kwargs = constructor_kwargs


def _decode_seq(mac: Any, tag: bytes, texts: Sequence[str], label: str) -> list[bytes]:
    try:
        raws = [pybase64.b64decode(t, validate=True) for t in texts]
    except (ValueError, TypeError):  # again, one by one, to name the culprit
        raws = [_b64decode(t, f"{label} {i}") for i, t in enumerate(texts)]
    # the same bytes as `_absorb` per payload, small ones fed to the MAC in one update
    parts = [tag + _LEN.pack(len(raws))]
    for raw in raws:
        size = len(raw)
        if size < 4096:
            parts += (_LEN.pack(size), raw)
        else:
            parts.append(_LEN.pack(size))
            mac.update(b"".join(parts))
            mac.update(raw)
            parts = []
    if parts:
        mac.update(b"".join(parts))
    return raws


def _decode_map(
    mac: Any, tag: bytes, texts: Mapping[str, str], label: str
) -> dict[str, bytes]:
    raws: dict[str, bytes] = {}
    mac.update(tag + _LEN.pack(len(texts)))
    if not texts:
        return raws
    for name in sorted(texts):
        raw = _b64decode(texts[name], f"{label} {name!r}")
        _frame(mac, b"=", name)
        _absorb(mac, raw)
        raws[name] = raw
    return raws


_canonical_json = msgspec.json.Encoder(order="sorted")


def _absorb_json(mac: Any, value: Any, what: str) -> None:
    """Feed one JSON value to the MAC as its canonical JSON (keys sorted, no spaces)."""
    try:
        raw = _canonical_json.encode(value)
    except (TypeError, ValueError, OverflowError) as exc:
        msg = f"{what} is not plain JSON: {exc}"
        raise SerializationError(msg) from exc
    _absorb(mac, raw)


def _json_seq(mac: Any, tag: bytes, values: Sequence[Any], label: str) -> None:
    mac.update(tag + _LEN.pack(len(values)))
    for i, value in enumerate(values):
        _absorb_json(mac, value, f"{label} {i}")


def _json_map(mac: Any, tag: bytes, values: Mapping[str, Any], label: str) -> None:
    mac.update(tag + _LEN.pack(len(values)))
    for name in sorted(values):
        _frame(mac, b"=", name)
        _absorb_json(mac, values[name], f"{label} {name!r}")


_Raws = tuple[list[bytes], dict[str, bytes], list[bytes], dict[str, bytes]]


def _payload_mac(req: FunctionRequest, key: bytes) -> tuple[Any, _Raws | None]:
    """The MAC over a request as it stands, and its raw pickles (``None`` in json format).

    Raises:
        SerializationError: a payload is not valid base64 (or, in json format, not JSON).
    """
    mac = _static_prefix(key, req).copy()
    if req.instance_id is not None:  # else the prefix holds these too
        _frame(mac, b"i", req.instance_id)
        mac.update(b"n" if req.create_new_instance else b"o")
    if req.serialization_format == "json":
        _json_seq(mac, b"a", req.args, "argument")
        _json_map(mac, b"k", req.kwargs, "argument")
        _json_seq(mac, b"c", req.constructor_args, "constructor argument")
        _json_map(mac, b"d", req.constructor_kwargs, "constructor argument")
        return mac, None
    args = _decode_seq(mac, b"a", req.args, "argument")
    if not (req.kwargs or req.constructor_args or req.constructor_kwargs):
        mac.update(_NO_KWARGS_NO_CONSTRUCTOR)  # the calls below for none, in one update
        return mac, (args, {}, [], {})
    kwargs = _decode_map(mac, b"k", req.kwargs, "argument")
    if req.constructor_args or req.constructor_kwargs:
        cargs = _decode_seq(mac, b"c", req.constructor_args, "constructor argument")
        ckwargs = _decode_map(mac, b"d", req.constructor_kwargs, "constructor argument")
    else:  # the same bytes as the two calls above absorb for none
        mac.update(_NO_CONSTRUCTOR)
        cargs, ckwargs = [], {}
    return mac, (args, kwargs, cargs, ckwargs)


def sign_request(req: FunctionRequest, key: bytes) -> FunctionRequest:
    """The request as it stands, its payloads untouched, signed with ``key``.

    For a request that arrives unsigned from a client trusted by other means (the local
    daemon signs what holders of its API key send, so that its workers still only run
    signed code). Works for both formats; any signature it carried is replaced.

    Raises:
        SerializationError: a payload is not valid base64 (cloudpickle format); the
            message names the argument.
    """
    mac, _ = _payload_mac(req, key)
    return msgspec.structs.replace(req, signature=_signature(mac))


def verify_request(req: FunctionRequest, key: bytes) -> None:
    """Check a request's signature without unpickling anything (see `decode_request`).

    Callers that act on a request's static fields before a worker decodes it (installing
    its ``dependencies``) call this first.

    Raises:
        PayloadSignatureError: the request is unsigned or its signature does not match.
        SerializationError: a payload is not valid base64.
    """
    decode_request(req, key, unpickle=False)


def decode_request(
    req: FunctionRequest, key: bytes, *, unpickle: bool = True
) -> DecodedRequest:
    """Authenticate a request, then unpickle its arguments.

    In json format the arguments are the request's own JSON values (nothing is unpickled).

    Raises:
        PayloadSignatureError: the request is unsigned or its signature does not match;
            nothing has been unpickled.
        SerializationError: a payload is not valid base64 or cannot be unpickled.
    """
    name = req.function_name or req.class_name
    if not req.signature:
        msg = (
            f"refusing unsigned request for {name!r}: payloads must carry a "
            f"signature (scheme v{SIGNATURE_VERSION}, {_SCHEMES[SIGNATURE_VERSION]}) "
            "under the endpoint's key"
        )
        raise PayloadSignatureError(msg)
    _check_scheme(req.signature, f"request for {name!r}")
    mac, raws = _payload_mac(req, key)
    if not hmac.compare_digest(_signature(mac) or "", req.signature):
        msg = (
            f"refusing request for {name!r}: its signature does not match (the payload "
            "was changed, or it was signed with another endpoint's key)"
        )
        raise PayloadSignatureError(msg)
    if not unpickle:
        return DecodedRequest([], {}, [], {})
    if raws is None:  # json format: the values themselves
        return DecodedRequest(
            req.args, req.kwargs, req.constructor_args, req.constructor_kwargs
        )
    args, kwargs, cargs, ckwargs = raws
    return DecodedRequest(
        _load_seq(args, "argument") if args else [],
        _load_map(kwargs, "argument") if kwargs else {},
        _load_seq(cargs, "constructor argument") if cargs else [],
        _load_map(ckwargs, "constructor argument") if ckwargs else {},
    )


def _load_seq(raws: list[bytes], label: str) -> list[Any]:
    """Unpickle authenticated payloads in order; an error names the one that failed."""
    values: list[Any] = []
    try:
        for raw in raws:
            values.append(cloudpickle.loads(raw))  # noqa: PERF401 (its length names a failure)
    except Exception as exc:
        msg = f"cannot deserialize {label} {len(values)}: {type(exc).__name__}: {exc}"
        raise SerializationError(msg) from exc
    return values


def _load_map(raws: dict[str, bytes], label: str) -> dict[str, Any]:
    """`_load_seq` for keyword payloads, in the order they were sent."""
    values: dict[str, Any] = {}
    name = ""
    try:
        for name, raw in raws.items():
            values[name] = cloudpickle.loads(raw)
    except Exception as exc:
        msg = f"cannot deserialize {label} {name!r}: {type(exc).__name__}: {exc}"
        raise SerializationError(msg) from exc
    return values


_prefixes: dict[tuple[Any, ...], Any] = {}
_PREFIXES_MAX = 256


def _static_prefix(key: bytes, req: FunctionRequest) -> Any:
    """The MAC over a request's static fields and method, computed once per key and code.

    Without an ``instance_id`` (the common call) it also holds the instance fields. The
    cache is bounded.
    """
    cache_key = (
        key,
        req.function_name,
        req.function_code,
        req.execution_type,
        req.class_name,
        req.class_code,
        tuple(sorted(req.modules.items())) if req.modules else (),
        req.serialization_format,
        None if req.dependencies is None else tuple(req.dependencies),
        None if req.system_dependencies is None else tuple(req.system_dependencies),
        req.accelerate_downloads,
        req.method_name,
        None if req.instance_id is not None else req.create_new_instance,
    )
    mac = _prefixes.get(cache_key)
    if mac is None:
        mac = _new_mac(key, b"request")
        _static_fields(mac, req)
        _frame(mac, b"m", req.method_name)
        if req.instance_id is None:
            _frame(mac, b"i", None)
            mac.update(b"n" if req.create_new_instance else b"o")
        if len(_prefixes) >= _PREFIXES_MAX:
            _prefixes.clear()
        _prefixes[cache_key] = mac
    return mac


def _signature_version(signature: str) -> int | None:
    """The scheme version a signature names; ``None`` when it is no signature of ours.

    ``"v<N>:..."`` names version N; 64 bare hex digits are version 1 (HMAC-SHA256, which
    carried no tag).
    """
    if not signature.isascii():
        return None
    head, tagged, _ = signature.partition(":")
    if tagged:
        number = head[1:]
        return (
            int(number)
            if head[:1] == "v" and number.isdigit() and len(number) < 6
            else None
        )
    if len(signature) == 64:  # an HMAC-SHA256 in hex
        try:
            bytes.fromhex(signature)
        except ValueError:
            return None
        return 1
    return None


def _check_scheme(signature: str, what: str) -> None:
    """Refuse a signature of another scheme than ours, naming both.

    Raises:
        PayloadSignatureError: ``signature`` is of another scheme, or of none we know.
    """
    if (
        len(signature) == _SIGNATURE_LEN
        and signature.startswith(_TAG)
        and signature.isascii()
    ):
        return  # ours (its hex digits are checked by the comparison that follows)
    version = _signature_version(signature)
    ours = f"v{SIGNATURE_VERSION} ({_SCHEMES[SIGNATURE_VERSION]})"
    if version is None or version == SIGNATURE_VERSION:
        msg = (
            f"refusing {what}: its signature is not one of ours (expected signature "
            f"scheme {ours}: {_TAG!r} and 64 hex digits)"
        )
    elif version < SIGNATURE_VERSION:
        msg = (
            f"refusing {what}: it is signed with signature scheme v{version} "
            f"({_SCHEMES.get(version, 'retired')}) by an older flash-actors, and this one "
            f"speaks only {ours}; run the same flash-actors version on the caller and the "
            "workers"
        )
    else:
        msg = (
            f"refusing {what}: it is signed with signature scheme v{version}, newer than "
            f"this flash-actors knows (it speaks {ours}); run the same flash-actors "
            "version on the caller and the workers"
        )
    raise PayloadSignatureError(msg)


_result_prefixes: dict[bytes, Any] = {}


def _result_mac(key: bytes) -> Any:
    """A fresh result MAC under ``key`` (its start computed once per key)."""
    prefix = _result_prefixes.get(key)
    if prefix is None:
        if len(_result_prefixes) >= _PREFIXES_MAX:
            _result_prefixes.clear()
        prefix = _result_prefixes[key] = _new_mac(key, b"result")
    return prefix.copy()


def encode_result(value: Any, key: bytes) -> tuple[str, str]:
    """Pickle and sign a function's return value: ``(base64 text, signature)``."""
    raw = dumps(value, what="the return value")
    mac = _result_mac(key)
    text = _absorb_encode(mac, raw)
    return text, _TAG + str(mac.hexdigest())


def _result_signature(key: bytes, raw: bytes) -> str:
    mac = _result_mac(key)
    _absorb(mac, raw)
    return _TAG + str(mac.hexdigest())


def decode_result(
    text: str, signature: str | None, key: bytes | None, *, source: str = ""
) -> Any:
    """Authenticate and unpickle a result made by `encode_result`.

    With ``key`` None (a provider whose endpoints are not signed, such as RunPod's, reached
    over TLS with the account's key) the result is trusted as Flash trusts it. ``source``
    names the call for messages (``"f() on endpoint 'e'"``).

    Raises:
        PayloadSignatureError: the result is unsigned or its signature does not match.
        ResultTypeUnavailableError: the result holds a type this process cannot import
            (the call itself succeeded).
        SerializationError: the result cannot be unpickled for another reason.
    """
    if key is not None and signature:
        _check_scheme(signature, "a result")
    raw = _b64decode(text, "the result")
    if key is not None and (
        not signature or not hmac.compare_digest(_result_signature(key, raw), signature)
    ):
        msg = (
            "refusing a result whose signature is missing or does not match "
            "(the worker does not hold this endpoint's key, or the result was changed)"
        )
        raise PayloadSignatureError(msg)
    try:
        return cloudpickle.loads(raw)
    except (ImportError, AttributeError) as exc:
        missing = _missing_types(raw, exc)
        if missing is None:
            raise SerializationError(_undecodable("the result", exc)) from exc
        module, names = missing
        raise ResultTypeUnavailableError(
            _unloadable_message(source, module, names, exc),
            missing_module=module,
            names=names,
        ) from exc
    except Exception as exc:
        raise SerializationError(_undecodable("the result", exc)) from exc


def _undecodable(what: str, exc: BaseException) -> str:
    return f"cannot deserialize {what}: {type(exc).__name__}: {exc}"


_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
     "BINSTRING", "SHORT_BINSTRING"}
)  # fmt: skip
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _pickle_globals(raw: bytes) -> list[str]:
    """The ``module.qualname`` references of a pickle, in order, read without loading it.

    ``GLOBAL`` carries both names; ``STACK_GLOBAL`` takes the two strings pushed (or fetched
    from the memo) just before it. A pickle that does not parse to the end gives what was
    read until then.
    """
    found: list[str] = []
    memo: dict[int, str | None] = {}
    pushed: list[str | None] = []  # what each of the last opcodes pushed (strings only)
    try:
        for opcode, arg, _ in pickletools.genops(raw):
            name = opcode.name
            if name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", ".", 1))
                value: str | None = None
            elif name == "STACK_GLOBAL":
                if len(pushed) >= 2 and pushed[-2] and pushed[-1]:
                    found.append(f"{pushed[-2]}.{pushed[-1]}")
                value = None
            elif name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
                continue  # pushes nothing
            elif name in _PUT_OPS and isinstance(arg, int):
                memo[arg] = pushed[-1] if pushed else None
                continue
            elif name in _GET_OPS and isinstance(arg, int):
                value = memo.get(arg)
            elif name in _STRING_OPS:
                value = arg if isinstance(arg, str) else None
            else:
                value = None
            pushed = [*pushed[-1:], value]
    except Exception:  # noqa: BLE001, S110 (a truncated or odd pickle: what was read so far)
        pass
    return found


def _importable(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _missing_types(
    raw: bytes, exc: BaseException
) -> tuple[str, tuple[str, ...]] | None:
    """The module this process lacks and the result's references into it, if that is why.

    ``None`` when the failure is not a missing module (or a missing name in one).
    """
    refs = _pickle_globals(raw)
    missing = getattr(exc, "name", None) if isinstance(exc, ImportError) else None
    if missing is None:
        if isinstance(exc, ImportError):
            unknown = [r for r in refs if not _importable(r)]
            if not unknown:
                return None
            missing = unknown[0].split(".")[0]
        elif str(exc).startswith("Can't get attribute"):  # a name the module lacks here
            parts = str(exc).split("'")
            attribute = parts[1] if len(parts) > 1 else ""
            hits = [r for r in refs if r.endswith("." + attribute)] if attribute else []
            if not hits:
                return None
            module = hits[0].rsplit(".", 1)[0]
            return module, tuple(hits)
        else:
            return None
    top = missing.split(".")[0]
    names = [r for r in refs if r == missing or r.startswith(f"{top}.")]
    names.sort(key=lambda r: not r.rsplit(".", 1)[-1][:1].isupper())  # classes first
    return missing, tuple(dict.fromkeys(names))


def _unloadable_message(
    source: str, module: str, names: tuple[str, ...], exc: BaseException
) -> str:
    call = source or "the remote call"
    if names:
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        what = f"it holds {shown}"
    else:
        what = f"it holds objects from {module!r}"
    top = module.split(".")[0]
    return (
        f"{call} succeeded remotely, but its result cannot be loaded here: {what}, and "
        f"this process cannot import them ({type(exc).__name__}: {exc}). Return plain "
        "Python values (dicts, lists, str, int, float, bytes; e.g. .tolist() or .item()) "
        f"from the function, or install {top!r} in the caller's environment too."
    )


# --- serialization_format "json" ----------------------------------------------------------------

_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
"""The integers every wire format we use carries (msgpack between the daemon and workers)."""


class _NotJson(Exception):
    """Raised by `_plain` at the first value that is not plain JSON; ``path`` grows outwards."""

    def __init__(self, value: Any, problem: str) -> None:
        super().__init__(problem)
        self.value = value
        self.problem = problem
        self.path: list[str] = []


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return value
    if kind is int:
        if _INT_MIN <= value <= _INT_MAX:
            return value
        raise _NotJson(value, "is an int outside the 64-bit range")
    if kind is float:
        if math.isfinite(value):
            return value
        raise _NotJson(value, f"is the float {value!r}, which JSON cannot carry")
    if kind is list or kind is tuple:
        items = []
        for i, item in enumerate(value):
            try:
                items.append(_plain(item))
            except _NotJson as exc:
                exc.path.append(f"[{i}]")
                raise
        return items
    if kind is dict:
        fields = {}
        for name, item in value.items():
            if type(name) is not str:
                problem = "has a key of type {type} (JSON object keys are strings)"
                raise _NotJson(name, problem)
            try:
                fields[name] = _plain(item)
            except _NotJson as exc:
                exc.path.append(f"[{name!r}]")
                raise
        return fields
    # Subclasses of the plain types (IntEnum, str enums, OrderedDict, named tuples).
    for base in (bool, int, float, str):
        if isinstance(value, base):
            return _plain(base(value))
    if isinstance(value, (list, tuple)):
        return _plain(list(value))
    if isinstance(value, dict):
        return _plain(dict(value))
    raise _NotJson(value, "is a {type}")


def to_json(value: Any, *, what: str = "value") -> Any:
    """``value`` as plain JSON data, for Flash's ``serialization_format: "json"``.

    Plain JSON data: dicts with string keys, lists, strings, 64-bit integers, finite floats,
    booleans and None. Tuples become lists and subclasses of those types their base type,
    so any JSON encoder takes the result.

    Raises:
        SerializationError: naming the first value that is not plain JSON, its type and
            where it sits in ``value``.
    """
    try:
        return _plain(value)
    except _NotJson as exc:
        kind = type(exc.value)
        name = kind.__qualname__
        if kind.__module__ != "builtins":
            name = f"{kind.__module__}.{name}"
        where = f"its item {''.join(reversed(exc.path))}" if exc.path else "it"
        msg = (
            f"{what} is not JSON-serialisable: {where} {exc.problem.format(type=name)}; "
            'serialization_format "json" carries only dicts with string keys, lists, '
            'strings, numbers, booleans and None (send "cloudpickle" for other types)'
        )
        raise SerializationError(msg) from None
    except RecursionError:
        msg = f"{what} is nested too deeply to send as JSON"
        raise SerializationError(msg) from None
