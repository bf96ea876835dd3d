"""The scoping check: names a remote function takes from module scope are reported."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import os
import sys
import textwrap
import warnings
from json import dumps as to_json
from os.path import join
from typing import TYPE_CHECKING, ClassVar, TypeVar
from xml.etree import ElementTree

import pytest

from flash_actors import LiveServerless, ScopeWarning, remote
from flash_actors._scoping import (
    OuterReference,
    find_outer_references,
    warn_outer_references,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from decimal import Decimal
    from pathlib import Path
    from types import ModuleType

SCALE = 3
COUNTER = 0


def helper() -> int:
    return 1


class Base:
    pass


F = TypeVar("F", bound="Callable[..., object]")


def deco(f: F) -> F:
    return f


# ------------------------------------------------------------------ target functions


def uses_module(data: str) -> str:
    return json.dumps(data)


def imports_inside(data: str) -> str:
    import json
    import os.path
    from xml.etree import ElementTree as Tree

    return json.dumps(data) + os.path.sep + Tree.__name__


def all_parameter_kinds(
    a: int, /, b: int, *args: int, c: int, d: int = 1, **kwargs: int
) -> object:
    return a, b, args, c, d, kwargs


def only_builtins(items: list[int]) -> object:
    print(len(items), sorted(items), isinstance(items, list), ValueError)
    return __name__, __file__, __debug__, __builtins__


def clean(
    x: int,
    y: Decimal,  # names in annotations are never evaluated on the worker
    *args: int,
    flag: bool = False,
    kw_only: os.PathLike[str] | None = None,
    **kw: int,
) -> tuple[object, ...] | json.JSONEncoder | Base:
    import math
    import xml.etree.ElementTree
    from collections import deque as dq

    total: int = sum(args) + len(kw) + x
    annotated_only: Decimal  # noqa: F842
    squares = [i * i for i in range(x) if i]
    pairs = {k: v * 2 for k, v in kw.items()}
    gen = sum(j for j in squares for _ in range(j))
    if (n := len(squares)) > 1:
        total += n
    for item, _ in zip(squares, squares, strict=True):
        total += item
    with memoryview(b"") as view:
        total += len(view)
    try:
        total += math.floor(1.5)
    except ValueError as error:
        print(error)
    match kw:
        case {"a": int(a), **rest}:
            total += a + len(rest)
        case {"b": bv} as whole:
            total += bv + len(whole)
    match args:
        case [first, *others]:
            total += first + len(others)
    tree = xml.etree.ElementTree
    counts = [total for _ in range(2)]
    counts += [m for m in range(2) if (last := m)]
    deleted = 1
    del deleted

    def inner(m: int) -> int:
        nonlocal total
        total += m
        return m + total + len(pairs) + last

    class Local:
        attr = total

        def method(self) -> int:
            return total + self.attr

    fn = lambda z, w=total: z + w  # noqa: E731
    return (inner(x), dq([flag]), clean, Local, fn, tree, gen, counts, y, kw_only)


def nested_uses_global() -> object:
    def inner() -> int:
        return SCALE

    return inner


def uses_globals() -> int:
    return SCALE + helper() + SCALE


def default_from_global(x: int = SCALE, *, y: object = helper) -> object:
    return x, y


def lambda_default_in_body() -> object:
    return lambda v=SCALE: v


def imported_function(a: str) -> str:
    return join(a, "b")


def recursive(n: int) -> int:
    return 1 if n <= 1 else n * recursive(n - 1)


def typo() -> int:
    return undefined_name  # type: ignore[name-defined,no-any-return]  # noqa: F821


def comprehension_does_not_leak() -> object:
    values = [leaked * 2 for leaked in range(3)]
    return values, leaked  # type: ignore[name-defined]  # noqa: F821


def shadows_module() -> object:
    json = {"local": True}
    return json["local"]


def bumps_counter() -> int:
    global COUNTER
    COUNTER += 1
    return COUNTER


def sets_counter() -> None:
    global COUNTER
    COUNTER = 5


@deco
@functools.lru_cache(maxsize=None)  # noqa: UP033
def decorated(x: int) -> str:
    return os.sep * x


def sorted_and_once() -> object:
    first = SCALE
    return first, json.dumps(1), json.loads("1"), SCALE


def many_kinds(x: int) -> object:
    return (json, to_json, ElementTree, pytest, SCALE, helper, Base, undefined_thing)  # type: ignore[name-defined]  # noqa: F821


class Model(Base):
    size = 3
    doubled: ClassVar[list[int]] = [
        n * 2 for n in range(size)
    ]  # first iterable: class scope, fine

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def predict(self) -> str:
        return json.dumps(self.k)

    def broken(self) -> int:
        return size  # type: ignore[name-defined,no-any-return]  # noqa: F821

    def again(self) -> str:
        return json.dumps(self.size)

    def make(self) -> Model:
        return Model(self.k)

    def cell(self) -> object:
        return __class__  # type: ignore[name-defined]

    @staticmethod
    def scaled(x: int) -> int:
        return x * SCALE

    @deco
    def decorated_method(self) -> None:
        pass


# ------------------------------------------------------------------------- helpers


def line_of(obj: object, needle: str, nth: int = 0) -> int:
    lines, start = inspect.getsourcelines(obj)  # type: ignore[arg-type]
    hits = [start + i for i, line in enumerate(lines) if needle in line]
    return hits[nth]


def refs_of(obj: Callable[..., object] | type) -> set[tuple[str, str]]:
    return {(ref.name, ref.kind) for ref in find_outer_references(obj)}


def load_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str
) -> ModuleType:
    path = tmp_path / "scoping_target.py"
    path.write_text(textwrap.dedent(source))
    spec = importlib.util.spec_from_file_location("scoping_target", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "scoping_target", module)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- tests


def test_module_import_is_reported_at_its_absolute_line() -> None:
    [ref] = find_outer_references(uses_module)
    assert ref == OuterReference(
        name="json",
        lineno=line_of(uses_module, "json.dumps"),
        filename=__file__,
        kind="module",
    )


def test_names_imported_inside_the_body_are_not_reported() -> None:
    assert find_outer_references(imports_inside) == []


def test_parameters_of_every_kind_are_local() -> None:
    assert find_outer_references(all_parameter_kinds) == []


def test_builtins_and_module_dunders_are_not_reported() -> None:
    assert find_outer_references(only_builtins) == []


def test_locals_nested_scopes_and_annotations_are_not_reported() -> None:
    # walrus, for, with, except, match captures, comprehensions, del, nonlocal, local
    # imports, nested def/class/lambda, and annotations naming module-level or
    # TYPE_CHECKING-only names
    assert find_outer_references(clean) == []


def test_shadowing_a_module_level_name_locally() -> None:
    assert find_outer_references(shadows_module) == []


def test_nested_function_using_a_global_is_reported() -> None:
    [ref] = find_outer_references(nested_uses_global)
    assert (ref.name, ref.kind) == ("SCALE", "global")
    assert ref.lineno == line_of(nested_uses_global, "return SCALE")


def test_global_constant_and_helper_function() -> None:
    assert refs_of(uses_globals) == {("SCALE", "global"), ("helper", "global")}


def test_default_values_are_checked() -> None:
    assert refs_of(default_from_global) == {("SCALE", "global"), ("helper", "global")}
    [ref] = find_outer_references(lambda_default_in_body)
    assert (ref.name, ref.kind) == ("SCALE", "global")


def test_name_imported_from_another_module() -> None:
    [ref] = find_outer_references(imported_function)
    assert (ref.name, ref.kind) == ("join", "import")


def test_recursion_is_not_reported() -> None:
    assert find_outer_references(recursive) == []


def test_undefined_names() -> None:
    [ref] = find_outer_references(typo)
    assert (ref.name, ref.kind) == ("undefined_name", "undefined")


def test_comprehension_variables_do_not_leak() -> None:
    [ref] = find_outer_references(comprehension_does_not_leak)
    assert (ref.name, ref.kind) == ("leaked", "undefined")
    assert ref.lineno == line_of(comprehension_does_not_leak, "return values")


def test_global_statement() -> None:
    [ref] = find_outer_references(bumps_counter)
    assert (ref.name, ref.kind) == ("COUNTER", "global")
    assert ref.lineno == line_of(bumps_counter, "COUNTER += 1")
    assert find_outer_references(sets_counter) == []  # assigned, never read


def test_decorators_are_skipped_and_lines_count_them() -> None:
    [ref] = find_outer_references(decorated)  # functools and deco are not reported
    assert (ref.name, ref.kind) == ("os", "module")
    assert ref.lineno == line_of(decorated, "os.sep")


def test_each_name_once_at_its_first_use_sorted_by_line() -> None:
    refs = find_outer_references(sorted_and_once)
    assert [ref.name for ref in refs] == ["SCALE", "json"]
    assert refs[0].lineno == line_of(sorted_and_once, "first = SCALE")
    assert refs[1].lineno == line_of(sorted_and_once, "json.dumps")


def test_classification() -> None:
    assert refs_of(many_kinds) == {
        ("json", "module"),
        ("to_json", "import"),
        ("ElementTree", "module"),
        ("pytest", "module"),
        ("SCALE", "global"),
        ("helper", "global"),
        ("Base", "global"),
        ("undefined_thing", "undefined"),
    }


def test_class_methods_are_checked() -> None:
    refs = find_outer_references(Model)
    assert {(r.name, r.kind) for r in refs} == {
        ("Base", "global"),  # base classes are evaluated on the worker
        ("json", "module"),
        ("size", "undefined"),  # class attributes are not visible in methods
        ("SCALE", "global"),
        ("deco", "global"),  # decorators of methods run on the worker
    }
    json_ref = next(r for r in refs if r.name == "json")
    assert json_ref.lineno == line_of(Model, "json.dumps")  # first use only
    assert [r.lineno for r in refs] == sorted(r.lineno for r in refs)


def test_closure_variables_are_reported() -> None:
    factor = 2
    calls = 0

    def scaled(x: int) -> int:
        nonlocal calls  # no binding for it in the source the worker compiles
        calls += 1
        return x * factor

    assert refs_of(scaled) == {("factor", "closure"), ("calls", "closure")}


def test_nested_function_source_with_unindented_string_lines() -> None:
    def report() -> str:
        text = """
at column zero
"""
        return text + json.dumps(1)

    [ref] = find_outer_references(report)
    assert (ref.name, ref.kind) == ("json", "module")
    assert ref.lineno == line_of(report, "json.dumps")


def test_no_source_no_references() -> None:
    namespace: dict[str, object] = {}
    exec("def made(x):\n    return json.dumps(x)\n", namespace)
    assert find_outer_references(namespace["made"]) == []  # type: ignore[arg-type]
    exec("class Made:\n    def f(self):\n        return json\n", namespace)
    assert find_outer_references(namespace["Made"]) == []  # type: ignore[arg-type]
    as_lambda = lambda: json  # noqa: E731  (only def and class statements are analysed)
    assert find_outer_references(as_lambda) == []
    assert find_outer_references(type("Dynamic", (), {})) == []
    assert find_outer_references(len) == []


def test_functions_of_another_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load_module(
        tmp_path,
        monkeypatch,
        """
        import json
        from tests.test_scoping import helper

        LIMIT = 1


        def local_helper():
            return 2


        def task(x):
            return json.dumps(x), helper(), local_helper(), LIMIT


        class Worker:
            def run(self):
                return helper(), local_helper()
        """,
    )
    path = str(tmp_path / "scoping_target.py")
    refs = find_outer_references(module.task)
    assert [(r.name, r.kind, r.lineno, r.filename) for r in refs] == [
        ("LIMIT", "global", 13, path),
        ("helper", "import", 13, path),
        ("json", "module", 13, path),
        ("local_helper", "global", 13, path),
    ]
    assert refs_of(module.Worker) == {("helper", "import"), ("local_helper", "global")}


@pytest.mark.skipif(sys.version_info < (3, 12), reason="PEP 695 syntax")
def test_type_parameters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = load_module(
        tmp_path,
        monkeypatch,
        """
        import json


        def generic[T](x: T, *, scale: int = 2) -> list[T]:
            type Pair = tuple[T, T]
            return [x, T, Pair, json]


        class Box[T](list[T]):
            def get(self) -> T:
                return T, json
        """,
    )
    assert refs_of(module.generic) == {("json", "module")}
    assert refs_of(module.Box) == {("json", "module")}


def test_warning_points_at_the_offending_line() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refs = warn_outer_references(uses_module)
    assert len(refs) == 1
    [warning] = caught
    assert warning.category is ScopeWarning
    assert warning.filename == __file__
    assert warning.lineno == line_of(uses_module, "json.dumps")
    assert str(warning.message) == (
        "@remote function 'uses_module' uses 'json' (a module imported at module "
        f"level) on line {warning.lineno} of test_scoping.py; it will not exist on the "
        "worker. Import it inside the function body: `import json`."
    )


def test_warning_messages_per_kind() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refs = warn_outer_references(many_kinds, qualname="app.many")
    assert len(caught) == len(refs) == 8
    assert {(w.filename, w.lineno) for w in caught} == {(__file__, refs[0].lineno)}
    messages = {ref.name: str(w.message) for ref, w in zip(refs, caught, strict=True)}
    assert all(
        m.startswith("@remote function 'app.many' uses ") for m in messages.values()
    )
    assert "`from xml.etree import ElementTree`" in messages["ElementTree"]
    assert "dependencies" not in messages["ElementTree"]  # the standard library
    assert (
        "`import pytest` (and list its package in dependencies=[...])"
        in messages["pytest"]
    )
    assert "(imported at module level from json)" in messages["to_json"]
    assert "`from json import dumps as to_json`" in messages["to_json"]
    assert "uses the global 'SCALE'" in messages["SCALE"]
    assert (
        "pass it as an argument or define it inside the function"
        in messages["SCALE"].lower()
    )
    assert "uses the module-level function 'helper'" in messages["helper"]
    assert "uses the module-level class 'Base'" in messages["Base"]
    assert "not defined anywhere" in messages["undefined_thing"]
    assert "NameError" in messages["undefined_thing"]


def test_warning_for_classes_and_closures() -> None:
    factor = 2

    def scaled(x: int) -> int:
        return x * factor

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_outer_references(scaled)
        warn_outer_references(Model)
    assert "a variable of an enclosing function" in str(caught[0].message)
    assert str(caught[1].message).startswith("@remote class 'Model' uses")
    assert all(w.category is ScopeWarning for w in caught)


def test_warning_filters_match_the_functions_module() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings(
            "ignore", category=ScopeWarning, module=uses_module.__module__
        )
        assert len(warn_outer_references(uses_module)) == 1
    assert caught == []


def test_no_warning_without_references() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_outer_references(clean) == []
        assert warn_outer_references(lambda: json) == []
    assert caught == []


def test_remote_decoration_warns() -> None:
    cfg = LiveServerless(name="scoping-warn")
    with pytest.warns(
        ScopeWarning,
        match=r"uses 'json' \(a module imported at module level\) on line \d+ ",
    ):

        @remote(cfg)
        async def encode(x: int) -> str:
            return json.dumps(x)
