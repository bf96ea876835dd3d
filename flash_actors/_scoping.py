"""Catch Flash's most common error early: names a remote function takes from module scope.

A ``@remote`` function's source is compiled on the worker in a fresh namespace, so a module
level import, global variable or helper of the user's module does not exist there. At
decoration time we find every name the function (or each method of a class) loads from module
scope, using the compiler's own scoping rules (`symtable`) on the function's source with its
decorators and annotations removed (annotations are not evaluated on the worker; default
values are), and warn once per name at the line of its first use.
"""

from __future__ import annotations

import ast
import builtins
import inspect
import symtable
import sys
import textwrap
import warnings
from dataclasses import dataclass
from typing import Any

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
    """One name a remote function loads from outside itself.

    Attributes:
        name: the name.
        lineno: line of its first use, in ``filename``.
        filename: the file that defines the function.
        kind: ``"module"`` (an imported module), ``"import"`` (something imported from
            another module), ``"global"`` (another value of the module) or ``"undefined"``.
    """

    name: str
    lineno: int
    filename: str
    kind: str


def _strip(node: ast.AST) -> None:
    """Remove what the worker does not evaluate: decorators and annotations."""
    for child in ast.walk(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            child.decorator_list = []
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            child.returns = None
        elif isinstance(child, ast.arg):
            child.annotation = None
        elif isinstance(child, ast.AnnAssign):
            child.annotation = ast.Constant(value=None)


def _loaded_from_module(table: symtable.SymbolTable, out: set[str]) -> None:
    for symbol in table.get_symbols():
        if symbol.is_referenced() and symbol.is_global():
            out.add(symbol.get_name())
    for child in table.get_children():
        _loaded_from_module(child, out)


def _first_uses(node: ast.AST) -> dict[str, int]:
    lines: dict[str, int] = {}
    for child in ast.walk(node):
        if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
            line = lines.get(child.id)
            if line is None or child.lineno < line:
                lines[child.id] = child.lineno
    return lines


def _classify(name: str, namespace: dict[str, Any], module: str) -> str:
    if name not in namespace:
        return "undefined"
    value = namespace[name]
    if inspect.ismodule(value):
        return "module"
    origin = getattr(value, "__module__", None)
    if (inspect.isclass(value) or callable(value)) and origin not in (None, module):
        return "import"
    return "global"


def find_outer_references(func: Any) -> list[OuterReference]:
    """Names ``func`` (a function or class) loads from module scope, by first use.

    Returns an empty list when the source cannot be read or parsed.
    """
    try:
        lines, start = inspect.getsourcelines(func)
        filename = inspect.getsourcefile(func) or "<unknown>"
    except (OSError, TypeError):
        return []
    try:
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except SyntaxError:
        return []
    if not tree.body or not isinstance(
        tree.body[0], ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
    ):
        return []
    node = tree.body[0]
    _strip(node)
    table = symtable.symtable(
        ast.unparse(ast.Module(body=[node], type_ignores=[])), "<remote>", "exec"
    )
    names: set[str] = set()
    for (
        symbol
    ) in table.get_symbols():  # default values, base classes: evaluated at def time
        if (
            symbol.is_referenced()
            and not symbol.is_assigned()
            and not symbol.is_imported()
        ):
            names.add(symbol.get_name())
    for child in table.get_children():
        _loaded_from_module(child, names)
    names -= _ALWAYS_THERE
    names.discard(node.name)
    if not names:
        return []
    module = getattr(func, "__module__", "") or ""
    if inspect.isclass(func):
        namespace = vars(sys.modules[module]) if module in sys.modules else {}
    else:
        namespace = getattr(func, "__globals__", {})
    first = _first_uses(node)
    found = [
        OuterReference(
            name=name,
            lineno=start + first.get(name, 1) - 1,
            filename=filename,
            kind=_classify(name, namespace, module),
        )
        for name in names
    ]
    return sorted(found, key=lambda ref: (ref.lineno, ref.name))


_ADVICE = {
    "module": "(a module imported at module level); import it inside the function body: "
    "`import {name}` (and list its package in dependencies=[...])",
    "import": "(imported at module level); import it inside the function body",
    "global": "(a global of its module); pass it as an argument or define it inside the function",
    "undefined": "which is not defined anywhere the worker can see; define or import it "
    "inside the function",
}


def warn_outer_references(
    func: Any, *, qualname: str | None = None, stacklevel: int = 2
) -> list[OuterReference]:
    """Warn (`ScopeWarning`, pointing at the line) for each outer reference; return them."""
    del stacklevel  # the warning points at the offending line instead
    found = find_outer_references(func)
    label = qualname or getattr(func, "__qualname__", repr(func))
    kind = "class" if inspect.isclass(func) else "function"
    for ref in found:
        advice = _ADVICE[ref.kind].format(name=ref.name)
        message = (
            f"@remote {kind} {label!r} uses {ref.name!r} on line {ref.lineno} of "
            f"{ref.filename} {advice}; it will not exist on the worker"
        )
        warnings.warn_explicit(
            message,
            ScopeWarning,
            ref.filename,
            ref.lineno,
            module=getattr(func, "__module__", None) or "flash_actors",
        )
    return found
