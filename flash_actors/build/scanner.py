"""Find a project's ``@remote`` functions and classes by reading its source, never running it.

`scan_project` walks a project folder (honouring ``.gitignore`` and ``.flashignore``, skipping
``.venv``, ``.flash``, ``__pycache__``, hidden folders and symlinks), parses every ``.py`` file
with `ast`, and records each ``@remote`` target: its module (dotted, from the project root),
qualified name, resource config (resolved to the resource class call that defines it, in the
same module or another module of the project), kind, and the other remote functions its body
references (the endpoint call edges). No user code is imported or executed.

Recognised decorators: ``remote`` from ``flash_actors`` or ``runpod_flash`` (also aliased, or as
``flash_actors.remote``), with the config positional or as ``resource_config=``. Every failure is
a `BuildError` with one clear line that names the file and line.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Literal

import msgspec
import pathspec

from flash_actors.errors import BuildError

__all__ = [
    "MAX_SOURCE_BYTES",
    "RESOURCE_CLASSES",
    "ScanResult",
    "ScannedConfig",
    "ScannedFunction",
    "project_files",
    "scan_project",
]

#: A ``.py`` file larger than this fails the scan (generated data belongs in ``.flashignore``).
MAX_SOURCE_BYTES = 8 * 1024 * 1024

#: The resource classes a config may be built from (``flash_actors.resources``' eight).
RESOURCE_CLASSES = frozenset(
    {
        "LiveServerless",
        "CpuLiveServerless",
        "ServerlessEndpoint",
        "CpuServerlessEndpoint",
        "LiveLoadBalancer",
        "CpuLiveLoadBalancer",
        "LoadBalancerSlsResource",
        "CpuLoadBalancerSlsResource",
    }
)
_LIBRARIES = frozenset({"flash_actors", "runpod_flash"})
_REMOTE_MODULES = frozenset({"flash_actors", "flash_actors.remote", "runpod_flash"})
_NESTED_CLASSES = frozenset({"PodTemplate", "NetworkVolume"})
_ENUMS = frozenset(
    {"GpuGroup", "CpuInstanceType", "DataCenter", "ServerlessScalerType"}
)
_SKIPPED_DIRS = frozenset({".venv", "venv", ".flash", "__pycache__", "node_modules"})
_IGNORE_FILES = (".gitignore", ".flashignore")
_MAX_VALUE_DEPTH = 32
_MAX_IMPORT_HOPS = 16
_MAX_SHOWN = 200

_NO_REMOTE_GUIDANCE = (
    "ensure your functions are decorated with @remote(resource_config), check that the Python "
    "files are not excluded by .gitignore or .flashignore, and verify the decorators have valid "
    "syntax"
)


class ScannedConfig(msgspec.Struct, kw_only=True, frozen=True):
    """A resource config as written in the source: a call of one of `RESOURCE_CLASSES`.

    ``config`` holds the keyword arguments whose values are literals (enum members as text,
    ``"GpuGroup.ADA_24"``); ``unresolved`` holds the source text of the others.
    """

    name: str
    resource_type: str
    config: dict[str, object]
    unresolved: dict[str, str]
    variable: str | None
    module: str
    file: str
    line: int

    @property
    def where(self) -> str:
        """``file:line`` of the call."""
        return f"{self.file}:{self.line}"


class ScannedFunction(msgspec.Struct, kw_only=True, frozen=True):
    """One ``@remote`` function or class."""

    module: str
    qualname: str
    file: str
    line: int
    resource: str
    kind: Literal["function", "class"]
    is_async: bool
    http_method: str | None = None
    http_path: str | None = None
    dependencies: list[str] | None = None
    system_dependencies: list[str] | None = None
    #: keys (``module:qualname``) of the remote functions this one's body references
    calls: list[str] = []

    @property
    def key(self) -> str:
        """``module:qualname``: unique in the project."""
        return f"{self.module}:{self.qualname}"


class ScanResult(msgspec.Struct, kw_only=True, frozen=True):
    """What `scan_project` found, every list sorted."""

    files: list[str]
    functions: list[ScannedFunction]
    resources: dict[str, ScannedConfig]
    #: resource name -> the other resources its functions call
    endpoint_calls: dict[str, list[str]]
    #: ``sha256:`` of the scanned files' relative paths and bytes
    fingerprint: str


# --------------------------------------------------------------------------- files


def _ignore_spec(directory: Path) -> pathspec.GitIgnoreSpec | None:
    lines: list[str] = []
    for name in _IGNORE_FILES:
        path = directory / name
        if path.is_file() and not path.is_symlink():
            try:
                lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError as exc:
                msg = f"cannot read {path}: {exc}"
                raise BuildError(msg) from exc
    return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None


def project_files(root: Path) -> list[str]:
    """Relative POSIX paths of the project's files, sorted: what a build ships.

    Every file the ignore rules keep (``.gitignore``, ``.flashignore``; hidden files and
    folders, ``.venv``, ``.flash``, ``__pycache__``, ``node_modules`` and symlinks are
    skipped), Python or not: a function may open a template or a data file next to it.
    Raises `BuildError` for a folder that cannot be listed.
    """
    found: list[str] = []
    specs: list[tuple[PurePosixPath, pathspec.GitIgnoreSpec]] = []

    def ignored(rel: PurePosixPath, *, is_dir: bool) -> bool:
        for base, spec in specs:
            if base != PurePosixPath(".") and base not in rel.parents:
                continue
            text = str(rel.relative_to(base)) + ("/" if is_dir else "")
            if spec.match_file(text):
                return True
        return False

    def unreadable(exc: OSError) -> None:
        where = (
            Path(exc.filename).relative_to(root).as_posix()
            if exc.filename
            else str(root)
        )
        msg = f"{where}: cannot list the folder: {exc.strerror or exc}: fix its permissions or add it to .flashignore"
        raise BuildError(msg)

    for current, dirnames, filenames in os.walk(
        root, onerror=unreadable, followlinks=False
    ):
        here = Path(current)
        rel_dir = PurePosixPath(here.relative_to(root).as_posix())
        spec = _ignore_spec(here)
        if spec is not None:
            specs.append((rel_dir, spec))
        kept = []
        for name in sorted(dirnames):
            rel = rel_dir / name
            if (
                name.startswith(".")
                or name in _SKIPPED_DIRS
                or (here / name).is_symlink()
                or ignored(rel, is_dir=True)
            ):
                continue
            kept.append(name)
        dirnames[:] = kept
        for name in sorted(filenames):
            rel = rel_dir / name
            path = here / name
            if (
                name.startswith(".")
                or path.is_symlink()
                or not path.is_file()
                or ignored(rel, is_dir=False)
            ):
                continue
            found.append(str(rel))
    return sorted(found)


def _module_name(rel: str) -> str:
    parts = list(PurePosixPath(rel).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _read(root: Path, rel: str) -> bytes:
    path = root / rel
    try:
        size = path.stat().st_size
        if size > MAX_SOURCE_BYTES:
            msg = (
                f"{rel}: {size} bytes, over the scanner's {MAX_SOURCE_BYTES}-byte limit for a "
                "Python file: add it to .flashignore if it holds no @remote functions"
            )
            raise BuildError(msg)
        return path.read_bytes()
    except OSError as exc:
        msg = f"{rel}: cannot read: {exc.strerror or exc}"
        raise BuildError(msg) from exc


def _parse(rel: str, source: bytes) -> ast.Module:
    try:
        return ast.parse(source, filename=rel)
    except SyntaxError as exc:
        line = exc.lineno if exc.lineno is not None else 1
        msg = f"{rel}:{line}: syntax error: {exc.msg}: fix it (or add the file to .flashignore)"
        raise BuildError(msg) from None
    except (RecursionError, MemoryError, ValueError) as exc:
        reason = (
            "too deeply nested"
            if isinstance(exc, RecursionError)
            else str(exc) or type(exc).__name__
        )
        msg = f"{rel}: cannot parse: {reason}: simplify it (or add the file to .flashignore)"
        raise BuildError(msg) from None


# --------------------------------------------------------------------------- modules


class _Module:
    """One parsed module: its imports and top-level bindings, by line."""

    def __init__(
        self, name: str, rel: str, tree: ast.Module, *, is_package: bool
    ) -> None:
        self.name = name
        self.rel = rel
        self.tree = tree
        self.package = name if is_package else name.rpartition(".")[0]
        #: local name -> (module, attribute or None for ``import m``, line)
        self.imports: dict[str, list[tuple[str, str | None, int]]] = {}
        #: local name -> [(value, line)] for module-level assignments
        self.assigns: dict[str, list[tuple[ast.expr, int]]] = {}
        #: top-level defs/classes (including those inside top-level if/try blocks)
        self.defs: list[ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef] = []
        self._collect(tree.body)

    def absolute(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = self.package.split(".") if self.package else []
        if level > 1:
            base = base[: len(base) - (level - 1)] if level - 1 <= len(base) else []
        return ".".join([*base, module] if module else base)

    def _collect(self, body: list[ast.stmt]) -> None:
        for stmt in body:
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname:
                        self.imports.setdefault(alias.asname, []).append(
                            (alias.name, None, stmt.lineno)
                        )
                    else:
                        top = alias.name.partition(".")[0]
                        self.imports.setdefault(top, []).append(
                            (top, None, stmt.lineno)
                        )
            elif isinstance(stmt, ast.ImportFrom):
                source = self.absolute(stmt.module, stmt.level)
                for alias in stmt.names:
                    if alias.name != "*":
                        local = alias.asname or alias.name
                        self.imports.setdefault(local, []).append(
                            (source, alias.name, stmt.lineno)
                        )
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    if isinstance(target, ast.Name):
                        self.assigns.setdefault(target.id, []).append(
                            (stmt.value, stmt.lineno)
                        )
            elif isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                if isinstance(stmt.target, ast.Name):
                    self.assigns.setdefault(stmt.target.id, []).append(
                        (stmt.value, stmt.lineno)
                    )
            elif isinstance(
                stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
            ):
                self.defs.append(stmt)
            elif isinstance(stmt, ast.If):
                if not _is_main_guard(stmt.test):
                    self._collect(stmt.body)
                self._collect(stmt.orelse)
            elif isinstance(stmt, ast.Try):
                self._collect(stmt.body)
                for handler in stmt.handlers:
                    self._collect(handler.body)
                self._collect(stmt.orelse)
                self._collect(stmt.finalbody)

    def library_name(self, node: ast.expr, before: int) -> tuple[str, str] | None:
        """``(library module, attribute)`` that ``node`` names, if it comes from our libraries."""
        if isinstance(node, ast.Name):
            for module, attr, line in reversed(self.imports.get(node.id, [])):
                if (
                    line <= before
                    and attr is not None
                    and module.partition(".")[0] in _LIBRARIES
                ):
                    return module, attr
            return None
        if isinstance(node, ast.Attribute):
            chain = _dotted(node.value)
            if chain is None:
                return None
            head, _, rest = chain.partition(".")
            for module, attr, line in reversed(self.imports.get(head, [])):
                if (
                    line <= before
                    and attr is None
                    and module.partition(".")[0] in _LIBRARIES
                ):
                    full = f"{module}.{rest}" if rest else module
                    return full, node.attr
            return None
        return None


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"``: code there never runs on a worker."""
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and len(test.comparators) == 1
        and isinstance(test.comparators[0], ast.Constant)
        and test.comparators[0].value == "__main__"
    )


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
        if len(parts) > _MAX_VALUE_DEPTH:
            return None
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


class _Unresolved(Exception):
    pass


def _value(module: _Module, node: ast.expr, depth: int = 0) -> object:
    """A literal value of ``node`` (enum members as ``"Enum.MEMBER"``), or `_Unresolved`."""
    if depth > _MAX_VALUE_DEPTH:
        raise _Unresolved
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str | int | float | bool) or node.value is None:
            return node.value
        raise _Unresolved
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _value(module, node.operand, depth + 1)
        if isinstance(inner, int | float) and not isinstance(inner, bool):
            return -inner
        raise _Unresolved
    if isinstance(node, ast.List | ast.Tuple | ast.Set):
        items = [_value(module, item, depth + 1) for item in node.elts]
        return sorted(items, key=repr) if isinstance(node, ast.Set) else items
    if isinstance(node, ast.Dict):
        out: dict[str, object] = {}
        for key, item in zip(node.keys, node.values, strict=True):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise _Unresolved
            out[key.value] = _value(module, item, depth + 1)
        return out
    if isinstance(node, ast.Attribute):
        chain = _dotted(node)
        if chain is not None:
            parts = chain.split(".")
            if len(parts) >= 2 and parts[-2] in _ENUMS:
                return f"{parts[-2]}.{parts[-1]}"
        raise _Unresolved
    if isinstance(node, ast.Call) and not node.args:
        func = _dotted(node.func)
        if func is not None and func.rpartition(".")[2] in _NESTED_CLASSES:
            return {
                kw.arg: _value(module, kw.value, depth + 1)
                for kw in node.keywords
                if kw.arg is not None
            }
    raise _Unresolved


def _segment(module_source: bytes, node: ast.expr) -> str:
    text = ast.get_source_segment(module_source.decode("utf-8", "replace"), node) or "?"
    text = " ".join(text.split())
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


# --------------------------------------------------------------------------- the scan


class _Scanner:
    def __init__(self, root: Path, files: list[str]) -> None:
        self.root = root
        self.files = files
        self.sources: dict[str, bytes] = {}
        self.modules: dict[str, _Module] = {}
        for rel in files:
            source = _read(root, rel)
            self.sources[rel] = source
            tree = _parse(rel, source)
            name = _module_name(rel)
            self.modules[name] = _Module(
                name, rel, tree, is_package=rel.endswith("__init__.py")
            )
        self.configs: dict[str, ScannedConfig] = {}
        self.config_cache: dict[tuple[str, int], ScannedConfig] = {}

    def _find_module(self, name: str, near: _Module) -> _Module | None:
        if name in self.modules:
            return self.modules[name]
        # a script run from its own folder imports its siblings by bare name
        if near.package and f"{near.package}.{name}" in self.modules:
            return self.modules[f"{near.package}.{name}"]
        return None

    def _config_from_call(
        self, module: _Module, call: ast.Call, variable: str | None
    ) -> ScannedConfig:
        cached = self.config_cache.get((module.rel, id(call)))
        if cached is not None:
            return cached
        where = f"{module.rel}:{call.lineno}"
        lib = module.library_name(call.func, call.lineno + 1)
        resource_type = lib[1] if lib is not None else None
        if resource_type not in RESOURCE_CLASSES:
            msg = f"{where}: the resource config is not a call of a resource class ({', '.join(sorted(RESOURCE_CLASSES))}) imported from flash_actors"
            raise BuildError(msg)
        if call.args:
            msg = f"{where}: {resource_type} takes keyword arguments only (name=...)"
            raise BuildError(msg)
        config: dict[str, object] = {}
        unresolved: dict[str, str] = {}
        for keyword in call.keywords:
            if keyword.arg is None:
                unresolved["**"] = _segment(self.sources[module.rel], keyword.value)
                continue
            try:
                config[keyword.arg] = _value(module, keyword.value)
            except _Unresolved:
                unresolved[keyword.arg] = _segment(
                    self.sources[module.rel], keyword.value
                )
        name = config.pop("name", None)
        if not isinstance(name, str) or not name:
            msg = f'{where}: {resource_type}\'s name must be a non-empty string literal (name="...")'
            raise BuildError(msg)
        scanned = ScannedConfig(
            name=name,
            resource_type=resource_type,
            config=config,
            unresolved=unresolved,
            variable=variable,
            module=module.name,
            file=module.rel,
            line=call.lineno,
        )
        self.config_cache[(module.rel, id(call))] = scanned
        return scanned

    def _resolve_name(
        self, module: _Module, name: str, line: int, use: str, hops: int = 0
    ) -> ScannedConfig:
        """The config bound to ``name`` in ``module`` before ``line``."""
        if hops > _MAX_IMPORT_HOPS:
            msg = f"{use}: resource config {name!r} is imported in a cycle"
            raise BuildError(msg)
        bindings: list[tuple[int, ast.expr | tuple[str, str | None]]] = [
            (at, value) for value, at in module.assigns.get(name, [])
        ]
        bindings += [
            (at, (src, attr)) for src, attr, at in module.imports.get(name, [])
        ]
        before = [b for b in bindings if b[0] < line]
        if not before:
            if bindings:
                first = min(at for at, _ in bindings)
                msg = (
                    f"{use}: resource config {name!r} is used before it is defined "
                    f"({module.rel}:{first}): define it above the function"
                )
            else:
                msg = f"{use}: resource config {name!r} is not defined in {module.rel} nor imported from the project"
            raise BuildError(msg)
        at, bound = max(before, key=lambda b: b[0])
        if isinstance(bound, ast.expr):
            if isinstance(bound, ast.Call):
                return self._config_from_call(module, bound, name)
            if isinstance(bound, ast.Name):
                return self._resolve_name(module, bound.id, at, use, hops + 1)
            msg = f"{use}: resource config {name!r} ({module.rel}:{at}) is not a resource class call"
            raise BuildError(msg)
        source, attr = bound
        target = self._find_module(source, module)
        if target is None:
            msg = f"{use}: resource config {name!r} comes from {source!r}, which is not a module of the project"
            raise BuildError(msg)
        if attr is None:
            msg = f"{use}: resource config {name!r} is a module, not a resource config"
            raise BuildError(msg)
        return self._resolve_name(target, attr, 1 << 30, use, hops + 1)

    def _module_of(
        self, module: _Module, node: ast.expr, before: int
    ) -> _Module | None:
        """The project module that ``node`` (``m``, ``pkg.m``) names in ``module``, if any."""
        chain = _dotted(node)
        if chain is None:
            return None
        first, _, rest = chain.partition(".")
        for src, attr, at in reversed(module.imports.get(first, [])):
            if at >= before:
                continue
            base = src if attr is None else f"{src}.{attr}"
            target = self._find_module(f"{base}.{rest}" if rest else base, module)
            if target is not None:
                return target
        return None

    def config_of(
        self, module: _Module, node: ast.expr, use_line: int
    ) -> ScannedConfig:
        use = f"{module.rel}:{use_line}"
        if isinstance(node, ast.Call):
            return self._config_from_call(module, node, None)
        if isinstance(node, ast.Name):
            return self._resolve_name(module, node.id, use_line, use)
        if isinstance(node, ast.Attribute):
            target = self._module_of(module, node.value, use_line)
            if target is not None:
                return self._resolve_name(target, node.attr, 1 << 30, use, 1)
        msg = f"{use}: cannot resolve the resource config {_segment(self.sources[module.rel], node)!r}: use a variable bound to a resource class call"
        raise BuildError(msg)

    def register(self, config: ScannedConfig) -> None:
        known = self.configs.get(config.name)
        if known is None:
            self.configs[config.name] = config
            return
        if (known.resource_type, known.config, known.unresolved) != (
            config.resource_type,
            config.config,
            config.unresolved,
        ):
            msg = (
                f"two resource configs are named {config.name!r} with different settings: "
                f"{known.where} and {config.where}: give them different names or one definition"
            )
            raise BuildError(msg)

    def remote_decorator(self, module: _Module, decorator: ast.expr) -> ast.Call | None:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        lib = module.library_name(target, decorator.lineno + 1)
        if lib is None or lib[1] != "remote" or lib[0] not in _REMOTE_MODULES:
            return None
        if not isinstance(decorator, ast.Call):
            msg = f"{module.rel}:{decorator.lineno}: @remote needs a resource config: @remote(resource_config)"
            raise BuildError(msg)
        return decorator

    def functions(self) -> list[ScannedFunction]:
        found: list[tuple[ScannedFunction, _Module, ast.AST]] = []
        for module in self.modules.values():
            for node in module.defs:
                for decorator in node.decorator_list:
                    call = self.remote_decorator(module, decorator)
                    if call is not None:
                        found.append((self._function(module, node, call), module, node))
                        break
        by_key: dict[str, ScannedFunction] = {}
        for fn, _, _ in found:
            twin = by_key.setdefault(fn.key, fn)
            if twin is not fn:
                msg = f"{fn.file}:{fn.line}: @remote {fn.qualname} is defined twice (also at line {twin.line}): rename one"
                raise BuildError(msg)
        out = []
        for fn, home, target in found:
            calls = self._calls(home, target, by_key)
            out.append(msgspec.structs.replace(fn, calls=sorted(calls - {fn.key})))
        return sorted(out, key=lambda f: (f.module, f.qualname))

    def _function(
        self,
        module: _Module,
        node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef,
        call: ast.Call,
    ) -> ScannedFunction:
        where = f"{module.rel}:{call.lineno}"
        options = {kw.arg: kw.value for kw in call.keywords if kw.arg is not None}
        config_node = (
            call.args[0] if call.args else options.pop("resource_config", None)
        )
        if config_node is None:
            msg = f"{where}: @remote needs a resource config: @remote(resource_config)"
            raise BuildError(msg)
        config = self.config_of(module, config_node, call.lineno)
        self.register(config)
        text: dict[str, object] = {}
        for key in ("method", "path", "dependencies", "system_dependencies"):
            if key in options:
                try:
                    text[key] = _value(module, options[key])
                except _Unresolved:
                    msg = f"{where}: @remote's {key}= must be a literal"
                    raise BuildError(msg) from None
        method, path = text.get("method"), text.get("path")
        deps, system = text.get("dependencies"), text.get("system_dependencies")
        for key, value in (("dependencies", deps), ("system_dependencies", system)):
            if value is not None and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                msg = f"{where}: @remote's {key}= must be a list of strings"
                raise BuildError(msg)
        for key, value in (("method", method), ("path", path)):
            if value is not None and not isinstance(value, str):
                msg = f"{where}: @remote's {key}= must be a string"
                raise BuildError(msg)
        return ScannedFunction(
            module=module.name,
            qualname=node.name,
            file=module.rel,
            line=node.lineno,
            resource=config.name,
            kind="class" if isinstance(node, ast.ClassDef) else "function",
            is_async=isinstance(node, ast.AsyncFunctionDef),
            http_method=method.upper() if isinstance(method, str) else None,
            http_path=path if isinstance(path, str) else None,
            dependencies=deps if isinstance(deps, list) else None,
            system_dependencies=system if isinstance(system, list) else None,
        )

    def _calls(
        self, module: _Module, node: ast.AST, by_key: dict[str, ScannedFunction]
    ) -> set[str]:
        """Keys of the remote functions ``node``'s body names (directly or ``module.attr``)."""
        calls: set[str] = set()
        defs = {d.name for d in module.defs}
        local: list[ast.stmt] = [
            c for c in ast.walk(node) if isinstance(c, ast.Import | ast.ImportFrom)
        ]
        if local:
            # imports inside the body (Flash's advice for worker code) count with the module's
            probe = _Module(
                module.name,
                module.rel,
                ast.Module(body=local, type_ignores=[]),
                is_package=module.rel.endswith("__init__.py"),
            )
            view = copy.copy(module)
            view.imports = {name: list(bound) for name, bound in module.imports.items()}
            for name, bound in probe.imports.items():
                view.imports.setdefault(name, []).extend(bound)
            module = view
        for child in ast.walk(node):
            if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Load):
                if child.id in defs and f"{module.name}:{child.id}" in by_key:
                    calls.add(f"{module.name}:{child.id}")
                    continue
                for src, attr, _ in module.imports.get(child.id, []):
                    if attr is not None:
                        target = self._find_module(src, module)
                        if target is not None and f"{target.name}:{attr}" in by_key:
                            calls.add(f"{target.name}:{attr}")
            elif isinstance(child, ast.Attribute) and isinstance(child.ctx, ast.Load):
                target = self._module_of(module, child.value, 1 << 30)
                if target is not None and f"{target.name}:{child.attr}" in by_key:
                    calls.add(f"{target.name}:{child.attr}")
        return calls

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for rel in self.files:
            digest.update(rel.encode())
            digest.update(b"\0")
            digest.update(hashlib.sha256(self.sources[rel]).digest())
        return "sha256:" + digest.hexdigest()


def scan_project(project_dir: Path | str) -> ScanResult:
    """Scan ``project_dir`` for ``@remote`` functions and classes without running any of it.

    Raises:
        BuildError: nothing found (the message lists the files scanned), a syntax error (file,
            line, message), a config used before it is defined or not found (which, where), or
            two configs with one name and different settings (both places).
    """
    root = Path(project_dir)
    if not root.is_dir():
        msg = f"{root}: not a project folder"
        raise BuildError(msg)
    files = [rel for rel in project_files(root) if rel.endswith(".py")]
    scanner = _Scanner(root, files)
    functions = scanner.functions()
    if not functions:
        shown = ", ".join(files[:20]) + (
            f" and {len(files) - 20} more" if len(files) > 20 else ""
        )
        msg = (
            f"No @remote functions found in {root} (scanned {len(files)} Python file(s): "
            f"{shown or 'none'}): {_NO_REMOTE_GUIDANCE}"
        )
        raise BuildError(msg)
    by_key = {fn.key: fn for fn in functions}
    edges: dict[str, set[str]] = {}
    for fn in functions:
        for key in fn.calls:
            target = by_key[key].resource
            if target != fn.resource:
                edges.setdefault(fn.resource, set()).add(target)
    return ScanResult(
        files=files,
        functions=functions,
        resources=dict(sorted(scanner.configs.items())),
        endpoint_calls={
            name: sorted(targets) for name, targets in sorted(edges.items())
        },
        fingerprint=scanner.fingerprint(),
    )
