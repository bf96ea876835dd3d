"""Warn at decoration time about names a ``@remote`` function takes from module scope.

A ``@remote`` function's source is compiled on the worker in a fresh module namespace, so
a module-level import, global variable, helper function or class of the user's module does
not exist there and the call fails with ``NameError`` (Flash's most common error). We parse
the function's source once, resolve every name it loads with Python's scoping rules
(parameters, locals, imports in the body, nested scopes, comprehensions, ``global`` and
``nonlocal``), and report the names that would be looked up in the worker's module
namespace. Decorators and annotations are skipped (the worker compiles with postponed
annotations, and the decorators are not sent); default values and base classes are
checked, because they are evaluated when the source is executed on the worker.

Names bound to ``@remote`` functions are not warned about: the function is sent with stubs
for them (`flash_actors.worker.nested`), and the worker calls them through the runtime.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import sys
import textwrap
import warnings
from dataclasses import dataclass
from pathlib import PurePath
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = [
    "OuterReference",
    "ScopeWarning",
    "find_outer_references",
    "warn_outer_references",
]

_ALWAYS_THERE = frozenset(dir(builtins)) | {
    "__name__",
    "__file__",
    "__builtins__",
    "__debug__",
}


class ScopeWarning(UserWarning):
    """A ``@remote`` function refers to a name that will not exist on the worker."""


@dataclass(frozen=True, slots=True)
class OuterReference:
    """One name a remote function loads from outside its own source.

    Attributes:
        name: The name, as written in the function.
        lineno: Line of its first use, counted in ``filename``.
        filename: The file that defines the function.
        kind: ``"module"`` (bound to an imported module), ``"import"`` (a function or
            class imported from another module), ``"global"`` (any other value of the
            function's module), ``"closure"`` (a variable of a function enclosing the
            decorated one) or ``"undefined"`` (defined nowhere: not a global of the
            module, not a builtin).
    """

    name: str
    lineno: int
    filename: str
    kind: str


# --------------------------------------------------------------------------- scopes


_ScopeKind = Literal["module", "function", "class", "comprehension"]


class _Scope:
    """The names one scope binds, declares and loads."""

    __slots__ = (
        "bound",
        "declared_global",
        "declared_nonlocal",
        "kind",
        "loads",
        "parent",
    )

    def __init__(self, kind: _ScopeKind, parent: _Scope | None) -> None:
        self.kind = kind
        self.parent = parent
        self.bound: set[str] = set()
        self.declared_global: set[str] = set()
        self.declared_nonlocal: set[str] = set()
        self.loads: list[tuple[str, int]] = []

    def function_scope(self) -> _Scope:
        """The scope a walrus in this scope binds in (comprehensions bind outside)."""
        scope = self
        while scope.kind == "comprehension" and scope.parent is not None:
            scope = scope.parent
        return scope


def _resolves_to_module(scope: _Scope, name: str) -> bool:
    """Whether a load of ``name`` in ``scope`` is looked up in the module namespace.

    Names bound in a scope are local to it unless declared ``global`` or ``nonlocal``
    there (the search then goes on outwards, to the module or an enclosing function).
    A class body's names are visible in the class body only, not in nested scopes.
    """
    current: _Scope | None = scope
    innermost = True
    while current is not None:
        if current.kind == "module":
            return name not in current.bound
        visible = innermost or current.kind != "class"
        if visible and name in current.declared_global:
            return True
        if visible and name in current.bound and name not in current.declared_nonlocal:
            return False
        if not innermost and current.kind == "class" and name == "__class__":
            return False  # the implicit cell of methods (zero-argument super())
        innermost = False
        current = current.parent
    return True  # pragma: no cover (the outermost scope is always a module)


def _arguments(args: ast.arguments) -> Iterable[ast.arg]:
    yield from args.posonlyargs
    yield from args.args
    if args.vararg is not None:
        yield args.vararg
    yield from args.kwonlyargs
    if args.kwarg is not None:
        yield args.kwarg


def _defaults(args: ast.arguments) -> list[ast.expr]:
    return [*args.defaults, *(d for d in args.kw_defaults if d is not None)]


def _type_param_scope(node: ast.AST, scope: _Scope) -> _Scope:
    """The annotation scope of PEP 695 type parameters (3.12+), or ``scope``."""
    params = getattr(node, "type_params", None) or []
    if not params:
        return scope
    inner = _Scope("function", scope)
    inner.bound.update(str(getattr(param, "name", "")) for param in params)
    return inner


class _Collector:
    """One pass over a definition: who binds, declares and loads which names."""

    def __init__(self) -> None:
        self.scopes: list[_Scope] = []
        self._todo: list[tuple[ast.AST, _Scope]] = []

    def new_scope(self, kind: _ScopeKind, parent: _Scope | None) -> _Scope:
        scope = _Scope(kind, parent)
        self.scopes.append(scope)
        return scope

    def push(self, nodes: Iterable[ast.AST | None], scope: _Scope) -> None:
        self._todo.extend((node, scope) for node in nodes if node is not None)

    def run(self) -> None:
        while self._todo:
            node, scope = self._todo.pop()
            self.visit(node, scope)

    def function(
        self,
        node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda,
        scope: _Scope,
        *,
        decorators: bool = True,
    ) -> None:
        """Defaults and decorators in ``scope``; parameters and body in a new scope."""
        self.push(_defaults(node.args), scope)
        if isinstance(node, ast.Lambda):
            body_scope = self.new_scope("function", scope)
            self.push([node.body], body_scope)
        else:
            if decorators:
                self.push(node.decorator_list, scope)
            scope.bound.add(node.name)
            body_scope = self.new_scope("function", _type_param_scope(node, scope))
            self.push(node.body, body_scope)
        body_scope.bound.update(arg.arg for arg in _arguments(node.args))

    def klass(
        self, node: ast.ClassDef, scope: _Scope, *, decorators: bool = True
    ) -> None:
        """Decorators, bases and keywords outside; the class body in a class scope."""
        if decorators:
            self.push(node.decorator_list, scope)
        scope.bound.add(node.name)
        outer = _type_param_scope(node, scope)
        if outer is not scope:
            self.scopes.append(outer)
        self.push(node.bases, outer)
        self.push((keyword.value for keyword in node.keywords), outer)
        body_scope = self.new_scope("class", outer)
        body_scope.bound.update(("__module__", "__qualname__"))
        self.push(node.body, body_scope)

    def comprehension(
        self,
        node: ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp,
        scope: _Scope,
    ) -> None:
        """The first iterable in ``scope``, everything else in the comprehension's."""
        inner = self.new_scope("comprehension", scope)
        for index, generator in enumerate(node.generators):
            self.push([generator.iter], scope if index == 0 else inner)
            self.push([generator.target, *generator.ifs], inner)
        if isinstance(node, ast.DictComp):
            self.push([node.key, node.value], inner)
        else:
            self.push([node.elt], inner)

    def visit(self, node: ast.AST, scope: _Scope) -> None:
        """Record what ``node`` binds or loads in ``scope`` and queue its children."""
        if isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                scope.loads.append((node.id, node.lineno))
            else:  # Store and Del both make the name local
                scope.bound.add(node.id)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            self.function(node, scope)
        elif isinstance(node, ast.ClassDef):
            self.klass(node, scope)
        elif isinstance(
            node, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp
        ):
            self.comprehension(node, scope)
        elif isinstance(node, ast.NamedExpr):
            scope.function_scope().bound.add(node.target.id)
            self.push([node.value], scope)
        elif isinstance(node, ast.AugAssign):
            if isinstance(node.target, ast.Name):  # ``x += 1`` reads x too
                scope.loads.append((node.target.id, node.target.lineno))
            self.push([node.target, node.value], scope)
        elif isinstance(node, ast.AnnAssign):  # the annotation is never evaluated
            self.push([node.target, node.value], scope)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                if alias.name != "*":
                    scope.bound.add(alias.asname or alias.name.partition(".")[0])
        elif isinstance(node, ast.Global):
            scope.declared_global.update(node.names)
        elif isinstance(node, ast.Nonlocal):
            scope.declared_nonlocal.update(node.names)
        elif isinstance(node, ast.ExceptHandler):
            if node.name is not None:
                scope.bound.add(node.name)
            self.push([node.type, *node.body], scope)
        elif isinstance(node, ast.MatchAs | ast.MatchStar):
            if node.name is not None:
                scope.bound.add(node.name)
            self.push(ast.iter_child_nodes(node), scope)
        elif isinstance(node, ast.MatchMapping):
            if node.rest is not None:
                scope.bound.add(node.rest)
            self.push(ast.iter_child_nodes(node), scope)
        elif type(node).__name__ == "TypeAlias":  # ``type X = ...`` (3.12+), lazy value
            name = getattr(node, "name", None)
            if isinstance(name, ast.Name):
                scope.bound.add(name.id)
        else:
            self.push(ast.iter_child_nodes(node), scope)


def _module_level_loads(node: ast.stmt) -> dict[str, int]:
    """Each name ``node`` loads from the worker's module namespace, at its first line."""
    collector = _Collector()
    module = collector.new_scope("module", None)
    if isinstance(node, ast.ClassDef):
        collector.klass(node, module, decorators=False)
    elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        collector.function(node, module, decorators=False)
    collector.run()
    first: dict[str, int] = {}
    resolved: dict[tuple[int, str], bool] = {}
    for scope in collector.scopes:
        for name, line in scope.loads:
            if name in _ALWAYS_THERE or line >= first.get(name, line + 1):
                continue
            key = (id(scope), name)
            outer = resolved.get(key)
            if outer is None:
                outer = resolved[key] = _resolves_to_module(scope, name)
            if outer:
                first[name] = line
    return first


# --------------------------------------------------------------------- source, names


def _parse(lines: list[str]) -> tuple[ast.stmt, int] | None:
    """The first statement of the source and the line offset to add to its lines."""
    source = "".join(lines)
    try:
        return ast.parse(textwrap.dedent(source)).body[0], 0
    except (SyntaxError, ValueError, IndexError, RecursionError):
        pass
    if not source[:1].isspace():
        return None
    # A multi-line string at column 0 defeats dedent: parse the block as the body of
    # an ``if``, keeping its indentation.
    try:
        wrapper = ast.parse("if 1:\n" + source).body[0]
    except (SyntaxError, ValueError, RecursionError):
        return None
    if not isinstance(wrapper, ast.If) or not wrapper.body:
        return None
    return wrapper.body[0], -1


def _freevars(target: object) -> set[str]:
    """Closure variables of a function, or of the methods of a class."""
    if inspect.isclass(target):
        names: set[str] = set()
        for value in vars(target).values():
            members = [value, getattr(value, "__func__", None)]
            if isinstance(value, property):
                members += [value.fget, value.fset, value.fdel]
            for member in members:
                names.update(
                    getattr(getattr(member, "__code__", None), "co_freevars", ())
                )
        return names
    code = getattr(target, "__code__", None)
    return set(getattr(code, "co_freevars", ()))


def _namespace(target: object) -> tuple[dict[str, Any], str]:
    """The module namespace the target was defined in, and that module's name."""
    module_name = str(getattr(target, "__module__", None) or "")
    if not inspect.isclass(target):
        namespace = getattr(target, "__globals__", None)
        if isinstance(namespace, dict):
            return namespace, str(namespace.get("__name__", module_name))
    module = sys.modules.get(module_name)
    if module is not None:
        return vars(module), module_name
    for value in vars(target).values() if inspect.isclass(target) else ():
        function = getattr(value, "__func__", value)
        namespace = getattr(function, "__globals__", None)
        if isinstance(namespace, dict):
            return namespace, module_name
    return {}, module_name


def _origin(value: object) -> str | None:
    """The module a function or class comes from, when known."""
    origin = getattr(value, "__module__", None)
    if isinstance(origin, str):
        return origin
    owner = getattr(value, "__self__", None)  # builtin functions of extension modules
    return owner.__name__ if isinstance(owner, ModuleType) else None


def _classify(
    name: str, namespace: dict[str, Any], module_name: str, freevars: set[str]
) -> str:
    if name in freevars:
        return "closure"
    if name not in namespace:
        return "undefined"
    value = namespace[name]
    if isinstance(value, ModuleType):
        return "module"
    if inspect.isclass(value) or inspect.isroutine(value):
        origin = _origin(value)
        if origin is not None and origin != module_name:
            return "import"
    return "global"


def find_outer_references(func: Callable[..., object] | type) -> list[OuterReference]:
    """Names the function (or every method of the class) loads from module scope.

    These are the names that will not exist on the worker, where the source is run in a
    fresh module: module-level imports, globals, helpers of the same module, closure
    variables of enclosing functions and undefined names. Builtins, the function's own
    name, and names bound anywhere inside the source are not reported; nor are names
    used only in decorators or annotations. Default values and base classes are
    checked: the worker evaluates them.

    Args:
        func: A function or a class, as passed to ``@remote``.

    Returns:
        One reference per name, at its first use, sorted by line. Empty when the source
        cannot be read or parsed on its own (a function typed at the REPL or built by
        ``exec``, a lambda).
    """
    try:
        target: Any = func if inspect.isclass(func) else inspect.unwrap(func)
        lines, start = inspect.getsourcelines(target)
        filename = inspect.getsourcefile(target) or inspect.getfile(target)
    except (OSError, TypeError, ValueError):  # ValueError: a cycle of __wrapped__
        return []
    parsed = _parse(lines)
    if parsed is None:
        return []
    node, offset = parsed
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return []  # a lambda, or a source that no longer matches the object
    code = getattr(target, "__code__", None)
    if code is not None and node.name != getattr(code, "co_name", node.name):
        return []
    first = _module_level_loads(node)
    first.pop(node.name, None)
    if not first:
        return []
    namespace, module_name = _namespace(target)
    freevars = _freevars(target)
    found = [
        OuterReference(
            name=name,
            lineno=start + offset + line - 1,
            filename=filename,
            kind=_classify(name, namespace, module_name, freevars),
        )
        for name, line in first.items()
    ]
    return sorted(found, key=lambda ref: (ref.lineno, ref.name))


# ------------------------------------------------------------------------- warnings


def _needs_dependency(module_name: str) -> bool:
    return module_name.partition(".")[0] not in sys.stdlib_module_names


def _import_statement(name: str, value: object) -> tuple[str, str | None]:
    """How to import ``value`` inside the function, and the module it comes from."""
    if isinstance(value, ModuleType):
        real = value.__name__
        parent, _, last = real.rpartition(".")
        if real == name:
            return f"import {name}", real
        if last == name and parent:
            return f"from {parent} import {name}", real
        return f"import {real} as {name}", real
    origin = _origin(value)
    attribute = getattr(value, "__name__", None)
    if origin is None or not isinstance(attribute, str) or not attribute.isidentifier():
        return "", origin
    # prefer the shortest public path: ``from pandas import DataFrame``, not
    # ``from pandas.core.frame import DataFrame``
    parts = origin.split(".")
    for end in range(1, len(parts) + 1):
        candidate = ".".join(parts[:end])
        if getattr(sys.modules.get(candidate), attribute, None) is value:
            origin = candidate
            break
    alias = "" if attribute == name else f" as {name}"
    return f"from {origin} import {attribute}{alias}", origin


def _message(ref: OuterReference, label: str, what: str, value: object) -> str:
    where = "function" if what == "function" else "method"
    head = f"@remote {what} {label!r} uses"
    at = f"on line {ref.lineno} of {PurePath(ref.filename).name}"
    gone = "it will not exist on the worker"
    if ref.kind in ("module", "import"):
        statement, origin = _import_statement(ref.name, value)
        if ref.kind == "module":
            about = "(a module imported at module level)"
        else:
            about = (
                "(imported at module level"
                + (f" from {origin}" if origin else "")
                + ")"
            )
        advice = f"Import it inside the {where} body"
        if statement:
            advice += f": `{statement}`"
        if origin is None or _needs_dependency(origin):
            advice += " (and list its package in dependencies=[...])"
        return f"{head} {ref.name!r} {about} {at}; {gone}. {advice}."
    if ref.kind == "closure":
        return (
            f"{head} {ref.name!r} (a variable of an enclosing function) {at}; {gone}. "
            f"Pass it as an argument or define it inside the {where}."
        )
    if ref.kind == "global":
        noun = "the global"
        if inspect.isclass(value):
            noun = "the module-level class"
        elif inspect.isroutine(value):
            noun = "the module-level function"
        return (
            f"{head} {noun} {ref.name!r} {at}; {gone}. "
            f"Pass it as an argument or define it inside the {where}."
        )
    return (
        f"{head} {ref.name!r} {at}, which is not defined anywhere (not a global of its "
        f"module, not a builtin); it will raise NameError on the worker. Define it or "
        f"import it inside the {where}."
    )


def _is_remote_function(value: object) -> bool:
    """A ``@remote`` function (`flash_actors.remote.RemoteFunction`; not imported here)."""
    cls = type(value)
    return cls.__name__ == "RemoteFunction" and cls.__module__ == "flash_actors.remote"


def warn_outer_references(
    func: Callable[..., object] | type,
    *,
    qualname: str | None = None,
    stacklevel: int = 2,
) -> list[OuterReference]:
    """Emit one `ScopeWarning` per outer reference of ``func``, and return them.

    A name bound to a ``@remote`` function gets no warning (it is sent along as a stub), but
    is returned with the others.

    Each warning is attributed to the offending line of the function's file (with
    `warnings.warn_explicit`), not to the caller, so an IDE or a test log points at the
    line to fix; warning filters match on the function's module.

    Args:
        func: A function or a class, as passed to ``@remote``.
        qualname: The name to show; defaults to ``func.__qualname__``.
        stacklevel: Accepted for symmetry with `warnings.warn`; unused, since the
            warning points at the offending line rather than at a caller.

    Returns:
        The references found by `find_outer_references`.
    """
    del stacklevel
    found = find_outer_references(func)
    if not found:
        return found
    target: Any = func if inspect.isclass(func) else inspect.unwrap(func)
    namespace, module_name = _namespace(target)
    label = qualname or str(getattr(target, "__qualname__", None) or repr(func))
    what = "class" if inspect.isclass(target) else "function"
    registry = namespace.setdefault("__warningregistry__", {}) if namespace else None
    for ref in found:
        if ref.kind in ("global", "import") and _is_remote_function(
            namespace.get(ref.name)
        ):
            continue  # sent along as a stub: the worker can call it
        warnings.warn_explicit(
            _message(ref, label, what, namespace.get(ref.name)),
            ScopeWarning,
            ref.filename,
            ref.lineno,
            module=module_name or None,
            registry=registry,
            module_globals=namespace or None,
        )
    return found
