"""Strict imports: a worker imports only what its endpoint would have on RunPod.

A local worker process runs on the caller's interpreter, so without this every package of the
caller's environment would be importable, and a function that imports a package it never
declared would work here and fail on RunPod (the seeds' common gotcha #3). `install` puts the
finders of ``sys.meta_path`` behind a policy (`Guard`) when the worker starts, before any user
code runs.
A top-level module is importable when it is:

- in the standard library (``sys.stdlib_module_names``) or built into the interpreter;
- part of the runtime: the modules of ``flash-actors`` and of every distribution it requires
  (the closure of its ``Requires-Dist`` for this platform, read from package metadata);
- in the endpoint's RunPod base image: Flash's GPU images (``runpod/flash``,
  ``runpod/flash-lb``) carry torch, torchvision and torchaudio, so on a GPU endpoint those and
  the distributions they require are importable when the caller's environment has them; the
  CPU images carry none of them;
- found on a ``sys.path`` entry the worker did not start with: the endpoint's dependency
  environments (``dependencies=[...]``, added by `flash_actors.worker.installer.activate`),
  or a directory the function added itself (as it could on RunPod);
- deployed code: the modules named by ``FLASH_DEPLOYED_MODULES`` and whatever lies in the
  ``PYTHONPATH`` directories of the worker's environment (the app's own code).

Anything else that the caller's environment has fails with the `ModuleNotFoundError` RunPod
would raise, its message naming the distribution that provides the module here and the
``dependencies=[...]`` to declare (or, for a module of the caller's own code, such as one in
its working directory, saying that live endpoints are not sent it). Probes stay faithful:
``importlib.util.find_spec`` answers ``None`` for such a module, as it would on RunPod, so
optional imports behave as there.

Only top-level modules are judged; the submodules of an admitted one follow it. Modules
already imported when the guards go in (the standard library's and the runtime's, and what
``.pth`` files load at interpreter start) stay importable. ``importlib.metadata`` still sees
the caller's distributions. A request's ``modules`` are not written out by the worker (no
client sends any); a directory that holds them once they are would be allowed as above.

The endpoint's image reaches the worker as ``FLASH_WORKER_IMAGE`` (`endpoint_env`, set by the
local pool; ``cpu`` when absent): ``gpu``, ``cpu``, or ``custom`` for an endpoint on its own
image (``imageName`` other than Flash's, ``templateId``), whose contents cannot be known here,
so its workers are not restricted.
``FLASH_STRICT_IMPORTS=0`` (in the caller's environment, or in one endpoint's ``env``) turns
the check off. The in-process provider runs functions in the caller's own process and is not
isolated.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import importlib.metadata
import os
import sys
from typing import TYPE_CHECKING

from flash_actors._logging import get_logger

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from types import ModuleType

    from flash_actors.resources import ServerlessResource

__all__ = [
    "ENV_IMAGE",
    "ENV_STRICT",
    "GPU_IMAGE_PACKAGES",
    "Guard",
    "StrictImports",
    "endpoint_env",
    "image_distributions",
    "image_kind",
    "install",
    "prepare",
    "requirement_closure",
    "runtime_distributions",
    "strict_enabled",
    "top_level_modules",
]

log = get_logger(__name__)

ENV_STRICT = "FLASH_STRICT_IMPORTS"
"""``0`` (or ``false``, ``no``, ``off``) lets workers import the caller's whole environment."""
ENV_IMAGE = "FLASH_WORKER_IMAGE"
"""The endpoint's RunPod image kind, as the worker learns it: ``gpu``, ``cpu`` or ``custom``."""

GPU_IMAGE_PACKAGES = ("torch", "torchvision", "torchaudio")
"""What Flash's GPU worker images carry besides the runtime (the CPU images carry none)."""

_RUNTIME = "flash-actors"
_OFF = frozenset({"0", "false", "no", "off"})


def image_kind(resource: ServerlessResource) -> str:
    """``gpu`` or ``cpu`` for the image RunPod runs the endpoint on; ``custom`` for its own.

    As the RunPod provider chooses it: the ``Cpu*`` classes get Flash's CPU images, every
    other Live class its GPU images (``runpod/flash``, ``runpod/flash-lb``). An endpoint
    that names one of Flash's images (as one saved through ``flash local``'s GraphQL does)
    gets that image's kind; any other image, or a ``templateId``, is ``custom``.
    """
    template = resource.template
    image = resource.imageName or (template.imageName if template else "")
    if image:
        from flash_actors.providers.local.controlplane.images import flash_image_kind

        kind = flash_image_kind(image)
        if kind is None:
            return "custom"
        return "cpu" if kind.endswith("cpu") else "gpu"
    if resource.templateId:
        return "custom"
    return "cpu" if type(resource).cpu_class else "gpu"


def endpoint_env(resource: ServerlessResource) -> dict[str, str]:
    """What a local worker of ``resource`` needs to know to be faithful to its image."""
    return {ENV_IMAGE: image_kind(resource)}


def strict_enabled(env: Mapping[str, str] | None = None) -> bool:
    """False when ``FLASH_STRICT_IMPORTS`` turns the check off, or the image is custom."""
    env = os.environ if env is None else env
    if env.get(ENV_STRICT, "1").strip().lower() in _OFF:
        return False
    return env.get(ENV_IMAGE, "cpu") != "custom"


def _canonical(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def requirement_closure(roots: Iterable[str]) -> frozenset[str]:
    """The installed distributions among ``roots`` and all they require (canonical names).

    Requirements are read from package metadata; markers are evaluated for this interpreter
    and platform, and extras are not followed. Roots that are not installed are left out.
    """
    from packaging.requirements import InvalidRequirement, Requirement

    seen: set[str] = set()
    todo = [_canonical(root) for root in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for text in dist.requires or []:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            todo.append(_canonical(req.name))
    return frozenset(seen)


@functools.cache
def runtime_distributions() -> frozenset[str]:
    """``flash-actors`` and the distributions it needs here (from package metadata)."""
    return requirement_closure([_RUNTIME]) | {_RUNTIME}


@functools.cache
def image_distributions(kind: str) -> frozenset[str]:
    """What the RunPod image of ``kind`` adds to the runtime, as far as this machine has it."""
    if kind != "gpu":
        return frozenset()
    return requirement_closure(GPU_IMAGE_PACKAGES)


@functools.cache
def _modules_of(dist_name: str) -> frozenset[str]:
    """The top-level modules of one installed distribution (empty when it is not here)."""
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return frozenset()
    listed = dist.read_text("top_level.txt")
    if listed:
        return frozenset(line.strip() for line in listed.splitlines() if line.strip())
    found: set[str] = set()
    for file in dist.files or []:
        parts = file.parts
        if not parts or parts[0] in ("..", "__pycache__") or ".dist-info" in parts[0]:
            continue
        if len(parts) > 1:
            if parts[0].isidentifier():
                found.add(parts[0])
        elif file.suffix in (".py", ".so", ".pyd"):
            name = parts[0].split(".", 1)[0]
            if name.isidentifier():
                found.add(name)
    return frozenset(found)


def top_level_modules(distributions: Iterable[str]) -> frozenset[str]:
    """The top-level modules the installed ``distributions`` provide."""
    found: set[str] = set()
    for dist in distributions:
        found |= _modules_of(_canonical(dist))
    return frozenset(found)


def _distribution_of(module: str) -> str | None:
    """The distribution that provides top-level ``module`` in this environment, if known."""
    dists = importlib.metadata.packages_distributions().get(module)
    return dists[0] if dists else None


def prepare() -> None:
    """Read the package metadata once (the template does it, so that each fork has it)."""
    top_level_modules(runtime_distributions() | image_distributions("gpu"))


def _real(path: str) -> str:
    return os.path.realpath(path or os.curdir)


def _entry_of(spec: importlib.machinery.ModuleSpec) -> list[str]:
    """The ``sys.path`` entries (real paths) a top-level module's spec was found on."""
    if spec.has_location and spec.origin:
        where = os.path.dirname(_real(spec.origin))
        if (
            spec.submodule_search_locations is not None
        ):  # a package: .../name/__init__.py
            where = os.path.dirname(where)
        return [where]
    if spec.origin is None and spec.submodule_search_locations is not None:
        return [os.path.dirname(_real(p)) for p in spec.submodule_search_locations]
    return []


class StrictImports:
    """What a worker may import (see the module docstring), applied by `Guard` finders.

    Args:
        allowed: top-level module names always importable (with the standard library's).
        initial_path: the ``sys.path`` the worker started with: the caller's environment,
            whose modules are refused unless ``allowed`` or under ``app_roots``.
        app_roots: directories of deployed code (``PYTHONPATH``).
        image: the endpoint's image kind, for the message.
    """

    def __init__(
        self,
        allowed: Iterable[str],
        initial_path: Sequence[str],
        app_roots: Iterable[str] = (),
        image: str = "cpu",
    ) -> None:
        self.allowed = frozenset(
            {*allowed, *sys.stdlib_module_names, *sys.builtin_module_names}
        )
        self.app_roots = frozenset(_real(p) for p in app_roots)
        self.initial = frozenset(_real(p) for p in initial_path) - self.app_roots
        self.image = image
        self.refused: set[str] = set()
        self._path_key: tuple[str, ...] = ()
        self._path: frozenset[str] = frozenset()

    def _current_path(self) -> frozenset[str]:
        key = tuple(sys.path)
        if key != self._path_key:
            self._path_key, self._path = key, frozenset(_real(p) for p in key)
        return self._path

    def _permitted(self, where: str) -> bool:
        if where in self.app_roots:
            return True
        return where in self._current_path() and where not in self.initial

    def admit(
        self, fullname: str, spec: importlib.machinery.ModuleSpec
    ) -> importlib.machinery.ModuleSpec | None:
        """``spec`` (trimmed for a namespace package) when it may be imported, else ``None``.

        Only top-level modules are judged: a submodule's parent has been already.
        """
        if "." in fullname or fullname in self.allowed:
            return spec
        places = _entry_of(spec)
        if not places:
            return spec  # built in, frozen, or from a finder we cannot place
        kept = [p for p in places if self._permitted(p)]
        if not kept:
            self.refused.add(fullname)
            return None
        if spec.origin is None and spec.submodule_search_locations is not None:
            # a namespace package: only its portions on permitted entries
            spec.submodule_search_locations = [
                loc
                for loc in spec.submodule_search_locations
                if os.path.dirname(_real(loc)) in kept
            ]
        return spec

    def wrap(self, finder: object) -> Guard:
        """``finder`` (an entry of ``sys.meta_path``) behind this policy."""
        return Guard(finder, self)

    def message(self, module: str, where: str | None = None) -> str:
        """The refusal: what RunPod would say, the package to declare, and the way out.

        ``where`` is the module's file here, for a module no distribution provides (the
        caller's own code, which a live endpoint is not sent).
        """
        image = {"gpu": "GPU", "cpu": "CPU"}.get(self.image, self.image)
        head = f"No module named {module!r}: "
        tail = f"; {ENV_STRICT}=0 lets local workers import the caller's packages."
        dist = _distribution_of(module)
        if dist is None and where is not None:
            return (
                f"{head}it is the caller's own code ({where}), which a live endpoint is "
                "not sent, so it would fail on RunPod. Define what the function needs "
                "inside it, or pass plain values as arguments" + tail
            )
        source = (
            f"the caller's environment has it from the distribution {dist!r}"
            if dist
            else "the caller's environment has it"
        )
        return (
            f"{head}this endpoint does not declare it and Flash's {image} worker image "
            f"does not have it, so it would fail on RunPod ({source}). Declare it: "
            f"@remote(..., dependencies=[{dist or module!r}])" + tail
        )


class Guard(importlib.abc.MetaPathFinder):
    """One ``sys.meta_path`` finder, answering only for what the policy admits.

    A refused module is "not found" to probes (``importlib.util.find_spec`` gets ``None``
    from every finder, as on RunPod) and a `ModuleNotFoundError` with the policy's message
    to an import statement. Everything else (``find_distributions``, ``invalidate_caches``)
    is the wrapped finder's.
    """

    def __init__(self, finder: object, policy: StrictImports) -> None:
        self.finder = finder
        self.policy = policy

    def __getattr__(self, name: str) -> object:
        return getattr(self.finder, name)

    def invalidate_caches(self) -> None:
        """The wrapped finder's."""
        invalidate = getattr(self.finder, "invalidate_caches", None)
        if invalidate is not None:
            invalidate()

    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None = None,
        target: ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        """The wrapped finder's spec, if the policy admits it (see the class docstring)."""
        find = getattr(self.finder, "find_spec", None)
        if find is None:
            return None
        spec: importlib.machinery.ModuleSpec | None = find(fullname, path, target)
        if spec is None or path is not None:
            return spec
        admitted = self.policy.admit(fullname, spec)
        if admitted is not None:
            return admitted
        if not _importing(sys._getframe(1)):  # noqa: SLF001 (who asks decides the answer)
            return None  # importlib.util.find_spec & co.: "not installed", as on RunPod
        where = _real(spec.origin) if spec.has_location and spec.origin else None
        raise ModuleNotFoundError(self.policy.message(fullname, where), name=fullname)


def _importing(frame: object) -> bool:
    """True when ``frame`` (the caller of ``find_spec``) serves an import statement.

    ``import x``, ``__import__`` and ``importlib.import_module`` reach the finders through
    ``_find_and_load_unlocked``; ``importlib.util.find_spec`` and other probes do not.
    """
    caller = getattr(frame, "f_back", None)
    code = getattr(caller, "f_code", None)
    return getattr(code, "co_name", "") == "_find_and_load_unlocked"


_installed: StrictImports | None = None


def install(env: Mapping[str, str] | None = None) -> StrictImports | None:
    """Put every finder of ``sys.meta_path`` behind the policy (once); ``None`` when off.

    Finders added later (by user code) are not wrapped.

    ``env`` is the worker's environment (default ``os.environ``): ``FLASH_STRICT_IMPORTS``,
    ``FLASH_WORKER_IMAGE``, ``FLASH_DEPLOYED_MODULES``, ``PYTHONPATH``.
    """
    global _installed
    env = os.environ if env is None else env
    if _installed is not None or not strict_enabled(env):
        return _installed
    image = env.get(ENV_IMAGE, "cpu")
    deployed = [
        m.strip().split(".")[0]
        for m in env.get("FLASH_DEPLOYED_MODULES", "").split(",")
        if m.strip()
    ]
    allowed = {
        "flash_actors",  # an editable install's metadata does not name its package
        *top_level_modules(runtime_distributions() | image_distributions(image)),
        *deployed,
    }
    app_roots = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    _installed = policy = StrictImports(allowed, list(sys.path), app_roots, image)
    sys.meta_path[:] = [
        finder
        if finder
        in (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)
        else policy.wrap(finder)
        for finder in sys.meta_path
    ]
    log.debug("worker.strict_imports", image=image, allowed=len(allowed))
    return _installed
