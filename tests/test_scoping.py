"""The scoping check: names a remote function takes from module scope are reported."""

from __future__ import annotations

import inspect
import json
import os
import warnings
from os.path import join

import pytest

from flash_actors import LiveServerless, ScopeWarning, remote
from flash_actors._scoping import find_outer_references, warn_outer_references

SCALE = 3


def helper() -> int:
    return 1


def uses_module(data: str) -> str:
    return json.dumps(data)


def clean(
    x: int,
    *args: int,
    flag: bool = False,
    kw_only: os.PathLike[str] | None = None,
    **kw: int,
) -> object:
    import math
    from collections import deque as dq

    total = sum(args) + len(kw)
    squares = [i * i for i in range(x)]
    if (n := len(squares)) > 1:
        total += n
    for item in squares:
        total += item
    try:
        total += math.floor(1.5)
    except ValueError as error:
        print(error)

    def inner(m: int) -> int:
        return m + total

    return inner(x), dq([flag]), clean  # recursion by its own name is fine


def uses_globals() -> int:
    return SCALE + helper()


def default_from_global(x: int = SCALE) -> int:
    return x


def imported_function(a: str) -> str:
    return join(a, "b")


def typo() -> int:
    return undefined_name  # type: ignore[name-defined,no-any-return]  # noqa: F821


class Model:
    size = 3

    def __init__(self, k: int) -> None:
        self.k = k

    def predict(self) -> str:
        return json.dumps(self.k)

    def broken(self) -> int:
        return size  # type: ignore[name-defined,no-any-return]  # noqa: F821  (class attrs are not visible here)


def line_of(func: object, needle: str) -> int:
    lines, start = inspect.getsourcelines(func)  # type: ignore[arg-type]
    return start + next(i for i, line in enumerate(lines) if needle in line)


def test_module_import_is_reported_at_its_line() -> None:
    [ref] = find_outer_references(uses_module)
    assert (ref.name, ref.kind) == ("json", "module")
    assert ref.lineno == line_of(uses_module, "json.dumps")
    assert ref.filename == __file__


def test_clean_function_has_no_false_alarm() -> None:
    # parameters of every kind, builtins, local imports, walrus, loops, except-as,
    # comprehensions, nested functions and annotations naming module-level imports
    assert find_outer_references(clean) == []


def test_globals_helpers_and_defaults() -> None:
    refs = {(r.name, r.kind) for r in find_outer_references(uses_globals)}
    assert refs == {("SCALE", "global"), ("helper", "global")}
    [ref] = find_outer_references(default_from_global)
    assert (ref.name, ref.kind) == ("SCALE", "global")


def test_imported_names_and_undefined_names() -> None:
    [ref] = find_outer_references(imported_function)
    assert (ref.name, ref.kind) == ("join", "import")
    [ref] = find_outer_references(typo)
    assert (ref.name, ref.kind) == ("undefined_name", "undefined")


def test_class_methods_are_checked() -> None:
    refs = {(r.name, r.kind) for r in find_outer_references(Model)}
    assert refs == {("json", "module"), ("size", "undefined")}


def test_closure_variables_are_reported() -> None:
    factor = 2

    def scaled(x: int) -> int:
        return x * factor

    [ref] = find_outer_references(scaled)
    assert ref.name == "factor"


def test_no_source_no_warning() -> None:
    namespace: dict[str, object] = {}
    exec("def made(x):\n    return json.dumps(x)\n", namespace)
    assert find_outer_references(namespace["made"]) == []
    as_lambda = lambda: json  # noqa: E731  (only def and class statements are analysed)
    assert find_outer_references(as_lambda) == []


def test_warning_points_at_the_offending_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refs = warn_outer_references(uses_module)
    assert len(refs) == 1
    [warning] = caught
    assert warning.category is ScopeWarning
    assert warning.filename == __file__
    assert warning.lineno == line_of(uses_module, "json.dumps")
    message = str(warning.message)
    assert "'json'" in message
    assert "import it inside the function body" in message
    assert "will not exist on the worker" in message


def test_remote_decoration_warns() -> None:
    cfg = LiveServerless(name="scoping-warn")
    with pytest.warns(
        ScopeWarning,
        match=r"uses 'json' on line \d+ .* \(a module imported at module level\)",
    ):

        @remote(cfg)
        async def encode(x: int) -> str:
            return json.dumps(x)
