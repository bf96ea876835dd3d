"""The exception hierarchy of flash-actors, under the seeds' public names.

```
FlashRuntimeError                   base of everything this package raises
├── RemoteExecutionError            the remote function raised; typed as the remote error too
├── SerializationError              cloudpickle/base64 failed, or a payload cannot travel
│   ├── PayloadTooLargeError        the encoded payload is over the message's limit
│   ├── PayloadSignatureError       a payload is unsigned or its MAC does not match
│   └── ResultTypeUnavailableError  the call succeeded remotely; its result's type cannot load here
├── GraphQLError                    the RunPod control plane answered with errors
│   ├── GraphQLMutationError
│   └── GraphQLQueryError
├── ManifestError                   the manifest is missing or invalid
│   └── BuildError                  the project scan found nothing, or bad source or configs
├── ManifestServiceUnavailableError the state manager cannot be reached
├── ConfigurationError (ValueError) bad arguments to @remote or to a resource config
│   └── InvalidRemoteTargetError (TypeError)  @remote on something not a function or class
├── ExecutionTimeoutError (TimeoutError)      a job ran past its execution timeout
├── DeliveryError                   a call could not reach a worker, or its worker died
│   └── NotDeliveredError           the request provably never reached the server
├── DeliveryUncertainError          a job may have been created; not sent again (not retried)
├── DependencyInstallError          pip or apt-get could not install an endpoint's dependencies
└── ActorError                      the actor runtime could not deliver or answer a message
    ├── ActorStoppedError           the actor stopped (or crashed) before it answered
    ├── AskTimeoutError (TimeoutError)  no answer within the ask's deadline
    ├── MailboxFullError            put_nowait on a full mailbox
    └── RuntimeNotRunningError      a call needs a runtime and none can be started
```

Every class survives pickling (`tests/test_errors.py` round-trips each one), so errors can
cross process boundaries. A remote failure arrives as a `RemoteExecutionError` whose class also
derives from the remote exception's type when that type can be rebuilt here (see
`RemoteExecutionError.from_remote`), so `except ValueError` catches a remote `ValueError`.
"""

from __future__ import annotations

import builtins
import threading
from typing import Any

__all__ = [
    "ActorError",
    "ActorStoppedError",
    "AskTimeoutError",
    "BuildError",
    "CallCycleError",
    "ConfigurationError",
    "DeliveryError",
    "DeliveryUncertainError",
    "DependencyInstallError",
    "ExecutionTimeoutError",
    "FlashRuntimeError",
    "GraphQLError",
    "GraphQLMutationError",
    "GraphQLQueryError",
    "InvalidRemoteTargetError",
    "MailboxFullError",
    "ManifestError",
    "ManifestServiceUnavailableError",
    "NotDeliveredError",
    "PayloadSignatureError",
    "PayloadTooLargeError",
    "RemoteExecutionError",
    "ResultTypeUnavailableError",
    "RuntimeNotRunningError",
    "SerializationError",
]


class FlashRuntimeError(Exception):
    """Base class of every error flash-actors raises."""


class SerializationError(FlashRuntimeError):
    """Arguments or a result could not be pickled, encoded, decoded or unpickled."""


class PayloadTooLargeError(SerializationError):
    """The base64 payload of a call is over the message's payload limit (10 MB by default).

    Raised before anything is sent; the message names the largest argument and both sizes.
    """


class PayloadSignatureError(SerializationError):
    """A payload arrived unsigned, altered, or signed with another signature scheme.

    Altered: its MAC does not match the endpoint's key. Another scheme: signed by a
    flash-actors that signs differently (the message names both versions). Raised before
    anything is unpickled.
    """


class ResultTypeUnavailableError(SerializationError):
    """The call succeeded remotely, but its result holds a type this process cannot load.

    A numpy array or a torch tensor returned to a caller without numpy or torch, say. The
    message names the endpoint, the function, the module that is missing here and the names
    the result's pickle refers to. ``missing_module`` is that module; ``names`` those
    ``module.qualname`` references.
    """

    def __init__(
        self, message: str, *, missing_module: str = "", names: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.missing_module = missing_module
        self.names = names

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_result_type_error,
            (str(self), self.missing_module, self.names),
        )


def _rebuild_result_type_error(
    message: str, missing_module: str, names: tuple[str, ...]
) -> ResultTypeUnavailableError:
    return ResultTypeUnavailableError(
        message, missing_module=missing_module, names=names
    )


class GraphQLError(FlashRuntimeError):
    """The RunPod control plane (GraphQL) answered with errors."""


class GraphQLMutationError(GraphQLError):
    """A GraphQL mutation failed."""


class GraphQLQueryError(GraphQLError):
    """A GraphQL query failed."""


class ManifestError(FlashRuntimeError):
    """The flash manifest is missing, unreadable, or does not describe a function."""


class BuildError(ManifestError):
    """`flash build` cannot describe the project: no ``@remote`` found, or bad source or configs."""


class ManifestServiceUnavailableError(FlashRuntimeError):
    """The state manager that serves the manifest cannot be reached."""


class ConfigurationError(FlashRuntimeError, ValueError):
    """`@remote` or a resource config was given values that cannot work.

    Raised at decoration or construction time; the message names the function or resource
    and the fix.
    """


class InvalidRemoteTargetError(ConfigurationError, TypeError):
    """`@remote` was applied to something that is neither a function nor a class."""


class CallCycleError(FlashRuntimeError):
    """A remote function called an endpoint that is already waiting on the same chain of calls."""


class ExecutionTimeoutError(FlashRuntimeError, TimeoutError):
    """A call ran longer than its execution timeout (load-balancer calls, `local=True`)."""


class ActorError(FlashRuntimeError):
    """The actor runtime could not deliver a message or produce its answer."""


class ActorStoppedError(ActorError):
    """The actor stopped, or crashed, before it answered; the call was not completed."""


class AskTimeoutError(ActorError, TimeoutError):
    """An ``ask`` got no answer within its deadline; the request was withdrawn."""


class DeliveryError(FlashRuntimeError):
    """A call could not be delivered or its worker died before answering (retryable)."""


class NotDeliveredError(DeliveryError):
    """The request provably never reached the server (refused connection, HTTP 429/503).

    Sending it again cannot create a second job, whatever the server.
    """


class DeliveryUncertainError(FlashRuntimeError):
    """The connection broke after a job's request was sent: the job may exist.

    Raised where the server cannot take the caller's job id (RunPod's ``/run``), so a retry
    could run the job twice; it is not retried. The message says what is known.
    """


class DependencyInstallError(FlashRuntimeError):
    """``dependencies`` or ``system_dependencies`` could not be installed.

    The message names the packages and gives the installer's reason.
    """


class MailboxFullError(ActorError):
    """`put_nowait`/`tell_nowait` found the actor's bounded mailbox full."""


class RuntimeNotRunningError(ActorError):
    """A call needs a running flash-actors runtime and none is running or can be started."""


class RemoteExecutionError(FlashRuntimeError):
    """The remote function raised.

    Attributes:
        remote_type: qualified name of the remote exception's class (``"builtins.ValueError"``).
        remote_traceback: the remote traceback text, as formatted on the worker.

    When the remote exception's class can be found here, the raised object is an instance of
    a class deriving from both `RemoteExecutionError` and that class (as Ray does), so it is
    caught by ``except ValueError`` and by ``except RemoteExecutionError`` alike. The remote
    traceback text is in `remote_traceback` and in ``str(error)``.
    """

    remote_type: str
    remote_traceback: str

    def __init__(
        self, message: str, *, remote_type: str = "", remote_traceback: str = ""
    ) -> None:
        super().__init__(message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        message = str(self.args[0]) if self.args else ""
        if self.remote_traceback:
            return f"{message}\n\nRemote traceback:\n{self.remote_traceback.rstrip()}"
        return message

    def __reduce__(self) -> tuple[Any, ...]:
        typed = type(self) is not RemoteExecutionError
        return (
            _rebuild_remote_error,
            (
                str(self.args[0]) if self.args else "",
                self.remote_type,
                self.remote_traceback,
                typed,
            ),
        )

    @classmethod
    def from_remote(
        cls, message: str, remote_type: str, remote_traceback: str
    ) -> RemoteExecutionError:
        """Build the error for a remote exception, typed as it when its class is known here.

        Args:
            message: ``str()`` of the remote exception.
            remote_type: ``module.QualName`` of its class.
            remote_traceback: the formatted remote traceback.
        """
        return _rebuild_remote_error(message, remote_type, remote_traceback)


_typed_classes: dict[type[BaseException], type[RemoteExecutionError]] = {}
_typed_lock = threading.Lock()


def _resolve_type(qualname: str) -> type[BaseException] | None:
    """Find an exception class by ``module.Name`` among already-imported modules."""
    import sys

    module_name, _, name = qualname.rpartition(".")
    module = sys.modules.get(module_name or "builtins", builtins)
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    if isinstance(obj, type) and issubclass(obj, Exception):
        return obj
    return None


def _typed_class(base: type[BaseException]) -> type[RemoteExecutionError] | None:
    if issubclass(base, RemoteExecutionError):
        return RemoteExecutionError
    with _typed_lock:
        cls = _typed_classes.get(base)
        if cls is None:
            try:
                cls = type(
                    f"RemoteExecutionError[{base.__name__}]",
                    (RemoteExecutionError, base),
                    {"__module__": __name__},
                )
            except TypeError:  # incompatible layouts: fall back to the untyped error
                return None
            _typed_classes[base] = cls
        return cls


def _rebuild_remote_error(
    message: str,
    remote_type: str,
    remote_traceback: str,
    typed: bool = True,  # noqa: FBT001, FBT002
) -> RemoteExecutionError:
    base = _resolve_type(remote_type) if remote_type and typed else None
    cls = _typed_class(base) if base is not None else None
    if cls is None:
        return RemoteExecutionError(
            message, remote_type=remote_type, remote_traceback=remote_traceback
        )
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.remote_type = remote_type
    error.remote_traceback = remote_traceback
    return error
