"""The exception tree: seeds' names, pickling, and remote errors typed as the remote class."""

from __future__ import annotations

import pickle

import pytest

import flash_actors
from flash_actors import errors
from flash_actors.errors import FlashRuntimeError, RemoteExecutionError


def test_seeds_hierarchy() -> None:
    assert issubclass(errors.RemoteExecutionError, FlashRuntimeError)
    assert issubclass(errors.SerializationError, FlashRuntimeError)
    assert issubclass(errors.PayloadTooLargeError, errors.SerializationError)
    assert issubclass(errors.GraphQLMutationError, errors.GraphQLError)
    assert issubclass(errors.GraphQLQueryError, errors.GraphQLError)
    assert issubclass(errors.GraphQLError, FlashRuntimeError)
    assert issubclass(errors.ManifestError, FlashRuntimeError)
    assert issubclass(errors.ManifestServiceUnavailableError, FlashRuntimeError)


@pytest.mark.parametrize("name", errors.__all__)
def test_every_error_survives_pickling(name: str) -> None:
    cls = getattr(errors, name)
    error = (
        cls("message")
        if cls is not RemoteExecutionError
        else cls(
            "message",
            remote_type="builtins.ValueError",
            remote_traceback="Traceback...",
        )
    )
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)


def test_remote_error_is_typed_as_the_remote_exception() -> None:
    error = RemoteExecutionError.from_remote(
        "bad value",
        "builtins.ValueError",
        "Traceback (most recent call last):\nValueError: bad value\n",
    )
    assert isinstance(error, ValueError)
    assert isinstance(error, RemoteExecutionError)
    assert error.remote_type == "builtins.ValueError"
    assert "Remote traceback:" in str(error)
    assert str(error).startswith("bad value")
    clone = pickle.loads(pickle.dumps(error))
    assert isinstance(clone, ValueError)
    assert isinstance(clone, RemoteExecutionError)
    assert clone.remote_traceback == error.remote_traceback


def test_remote_error_of_unknown_type_is_untyped() -> None:
    error = RemoteExecutionError.from_remote("x", "nowhere.module.Missing", "tb")
    assert type(error) is RemoteExecutionError
    assert error.remote_type == "nowhere.module.Missing"


def test_remote_error_of_class_in_loaded_module() -> None:
    error = RemoteExecutionError.from_remote("x", "json.decoder.JSONDecodeError", "tb")
    import json

    typ: type = type(error)
    assert issubclass(typ, json.JSONDecodeError)


def test_public_exceptions_derive_from_base() -> None:
    for name in flash_actors.__all__:
        obj = getattr(flash_actors, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            if issubclass(obj, Warning):
                continue
            assert issubclass(obj, FlashRuntimeError), name
