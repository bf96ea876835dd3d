"""The build's import check: every module-level import of the project resolves in the archive.

A deployed worker imports the resource's modules when it starts; a module-level ``import
pandas`` that the archive cannot satisfy crashes every worker of the endpoint, far from the
build that could have said so (the seeds' "Verify all imports in your worker modules are
available"). `check_imports` reads the project's Python files (no code runs) and checks the
first name of each import executed at import time: module level, class bodies, ``if``/
``else`` and ``with`` blocks. It resolves when it is in the standard library, a module or
package of the build folder (the project, its installed dependencies, the flash-actors
runtime), or a package the target image already has (``base_image``: what ``--exclude`` and
the GPU defaults leave out, and RunPod's ``runpod`` / ``runpod_flash``).

Not checked, because they cannot crash a worker at start or say they may fail: imports inside
functions (Flash's own pattern; they run on a call, with the function's ``dependencies``),
under ``if TYPE_CHECKING:``, inside a ``try`` whose handlers catch ``ImportError`` (or a
parent of it), and relative imports (the project's own).
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flash_actors.errors import BuildError

if TYPE_CHECKING:
    from collections.abc import Collection, Iterator
    from pathlib import Path

__all__ = ["MissingImport", "check_imports", "missing_imports"]

#: Packages every RunPod Flash worker image has.
IMAGE_PACKAGES = frozenset({"runpod", "runpod_flash"})
_IMPORT_ERRORS = frozenset(
    {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
)


@dataclass(frozen=True)
class MissingImport:
    """One import the archive cannot satisfy."""

    file: str
    line: int
    name: str


def _catches_import_errors(node: ast.Try) -> bool:
    for handler in node.handlers:
        if handler.type is None:
            return True
        kinds = (
            handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        )
        for kind in kinds:
            name = (
                kind.attr
                if isinstance(kind, ast.Attribute)
                else getattr(kind, "id", "")
            )
            if name in _IMPORT_ERRORS:
                return True
    return False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _eager_imports(body: list[ast.stmt]) -> Iterator[tuple[int, str]]:
    """``(line, first name)`` of each absolute import run when the module is imported."""
    for node in body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".", 1)[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module.split(".", 1)[0]
        elif isinstance(node, ast.ClassDef):
            yield from _eager_imports(node.body)
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                yield from _eager_imports(node.body)
            yield from _eager_imports(node.orelse)
        elif isinstance(node, ast.With | ast.AsyncWith):
            yield from _eager_imports(node.body)
        elif isinstance(node, ast.Try):
            if not _catches_import_errors(node):
                yield from _eager_imports(node.body)
            yield from _eager_imports(node.orelse)
            yield from _eager_imports(node.finalbody)
        # function bodies run on a call, not at import: not checked


def _importable(build_dir: Path, name: str) -> bool:
    if (build_dir / name).is_dir() or (build_dir / f"{name}.py").is_file():
        return True
    return any(build_dir.glob(f"{name}.*.so")) or any(build_dir.glob(f"{name}.*.pyd"))


def missing_imports(
    build_dir: Path, files: Collection[str], *, base_image: Collection[str] = ()
) -> list[MissingImport]:
    """The eager imports of ``files`` (relative to ``build_dir``) that nothing there satisfies."""
    known = set(sys.stdlib_module_names) | {"__future__"} | set(IMAGE_PACKAGES)
    known |= {name.replace("-", "_") for name in base_image}
    found: list[MissingImport] = []
    for rel in sorted(files):
        if not rel.endswith(".py"):
            continue
        try:
            tree = ast.parse((build_dir / rel).read_bytes(), filename=rel)
        except (OSError, SyntaxError, ValueError):
            continue  # the scan already reported what it could not read
        for line, name in _eager_imports(tree.body):
            if name in known or _importable(build_dir, name):
                continue
            found.append(MissingImport(rel, line, name))
    return found


def check_imports(
    build_dir: Path, files: Collection[str], *, base_image: Collection[str] = ()
) -> None:
    """Fail the build at the first eager import the archive cannot satisfy.

    Raises:
        BuildError: ``file:line`` imports a package that is neither in the standard library,
            the project, the installed dependencies nor the base image; the message says how
            to add it (and how many more there are).
    """
    missing = missing_imports(build_dir, files, base_image=base_image)
    if not missing:
        return
    first = missing[0]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    msg = (
        f"{first.file}:{first.line}: imports {first.name!r} when the module loads, but the "
        f"archive does not have it{more}: add it to requirements.txt or the resource's "
        "dependencies=[...], or import it inside the function that uses it"
    )
    raise BuildError(msg)
