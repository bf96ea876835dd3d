"""The Registry: resource configs by endpoint name, and the endpoint of each function.

``@remote`` registers into the process-wide `REGISTRY` at decoration time; a manifest adds the
endpoints of a built app. Two different configs under one name are refused: the name is the
endpoint's identity. Functions are keyed by ``module:qualname`` (the manifest's keys), so two
``process`` functions in two modules do not collide; a bare name is looked up only where it
names one function.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import msgspec

from flash_actors import resources
from flash_actors.errors import ConfigurationError, ManifestError
from flash_actors.manifest import Manifest, load_manifest
from flash_actors.resources import ServerlessResource

if TYPE_CHECKING:
    from pathlib import Path

    from flash_actors.messages import FunctionRequest

__all__ = ["REGISTRY", "Registry", "resource_from_config"]

_RESOURCE_CLASSES: dict[str, type[ServerlessResource]] = {
    name: getattr(resources, name)
    for name in resources.__all__
    if isinstance(getattr(resources, name), type)
    and issubclass(getattr(resources, name), ServerlessResource)
    and getattr(resources, name) is not ServerlessResource
    and getattr(resources, name) is not resources.LoadBalancerResource
}


def resource_from_config(
    resource_type: str, name: str, config: dict[str, object]
) -> ServerlessResource:
    """A resource config rebuilt from its class name and fields (a manifest's, or a stub's).

    Raises:
        ManifestError: unknown class, or fields it does not take.
    """
    cls = _RESOURCE_CLASSES.get(resource_type)
    if cls is None:
        msg = f"resource {name!r} has unknown resource_type {resource_type!r}"
        raise ManifestError(msg)
    try:
        return msgspec.convert({**config, "name": name}, cls)
    except (msgspec.ValidationError, ConfigurationError) as exc:
        msg = f"resource {name!r}: {exc}"
        raise ManifestError(msg) from exc


class Registry:
    """Where functions live. Thread-safe; lookups are plain dict reads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources: dict[str, ServerlessResource] = {}
        self._functions: dict[str, str] = {}
        self.manifest_functions: dict[str, str] = {}
        """``module:qualname`` -> endpoint, from the manifests loaded (what the Router trusts
        in deployed code)."""
        self._routes: dict[str, dict[tuple[str, str], tuple[str, FunctionRequest]]] = {}
        self.generation = 0
        self._warm = 0
        """Counts changes: callers that cache where the Router sent them check it (see
        `flash_actors.remote`)."""

    def register(self, resource: ServerlessResource, *, owner: str = "") -> None:
        """Record a resource config under its name.

        Raises:
            ConfigurationError: another, different config already has that name.
        """
        with self._lock:
            known = self._resources.get(resource.name)
            if known is None:
                self._resources[resource.name] = resource
                self.generation += 1
                return
            if known is resource or known.same_config(resource):
                return
        where = f" (while decorating {owner})" if owner else ""
        msg = (
            f"two different resource configs are named {resource.name!r}{where}: "
            f"{_difference(known, resource)}. An endpoint name identifies one config; "
            "give the second a different name, or reuse the first object"
        )
        raise ConfigurationError(msg)

    def register_route(
        self,
        endpoint: str,
        method: str,
        path: str,
        owner: str,
        template: FunctionRequest,
    ) -> None:
        """Record a load-balancer route and the request template of its function.

        Raises:
            ConfigurationError: another function already serves that method and path.
        """
        with self._lock:
            routes = self._routes.setdefault(endpoint, {})
            held = routes.get((method, path))
            if held is None or held[0] == owner:
                routes[(method, path)] = (owner, template)
                self.generation += 1
                return
        msg = (
            f"@remote {owner}: route {method} {path} of endpoint {endpoint!r} is already "
            f"taken by {held[0]}; give one of them another path"
        )
        raise ConfigurationError(msg)

    def routes(self, endpoint: str) -> list[tuple[str, str, FunctionRequest]]:
        """The load-balancer routes of an endpoint: ``(method, path, request template)``."""
        with self._lock:
            return [
                (method, path, template)
                for (method, path), (_, template) in self._routes.get(
                    endpoint, {}
                ).items()
            ]

    def register_function(self, function: str, endpoint: str) -> None:
        """Record that ``function`` (``module:qualname``) runs on ``endpoint``.

        The last registration of a key wins.
        """
        with self._lock:
            if self._functions.get(function) != endpoint:
                self._functions[function] = endpoint
                self.generation += 1

    def resource(self, name: str) -> ServerlessResource:
        """The config of endpoint ``name``.

        Raises:
            ManifestError: no such endpoint is known.
        """
        try:
            config = self._resources[name]
        except KeyError:
            msg = f"no endpoint named {name!r} is registered (decorate a function with it, or load a manifest)"
            raise ManifestError(msg) from None
        if self._warm and config.workersMin < self._warm <= config.workersMax:
            return msgspec.structs.replace(config, workersMin=self._warm)
        return config

    def keep_warm(self, workers: int = 1) -> None:
        """From now on every endpoint keeps at least ``workers`` workers started.

        Its config reads ``workersMin`` of at least ``workers`` (where its ``workersMax``
        allows): what ``flash run --auto-provision`` asks for. 0 turns it off.

        Raises:
            ValueError: ``workers`` is negative.
        """
        if workers < 0:
            msg = f"keep_warm: workers must be 0 or more, got {workers}"
            raise ValueError(msg)
        self._warm = workers

    def endpoint_of(self, function: str) -> str:
        """The endpoint a function runs on, by ``module:qualname`` (or a bare name, if unique).

        Raises:
            ManifestError: the function is unknown, or a bare name matches functions of
                several modules (the message lists their keys).
        """
        endpoint = self._functions.get(function)
        if endpoint is not None:
            return endpoint
        if ":" not in function:
            with self._lock:
                matches = sorted(
                    key
                    for key in self._functions
                    if key.rpartition(":")[2] == function
                    or key.rpartition(":")[2].rpartition(".")[2] == function
                )
            if len(matches) == 1:
                return self._functions[matches[0]]
            if matches:
                msg = (
                    f"function name {function!r} is ambiguous: it names "
                    f"{', '.join(matches)}; look it up by module:qualname"
                )
                raise ManifestError(msg)
        msg = f"function {function!r} is not in the registry or the manifest"
        raise ManifestError(msg)

    def resources(self) -> list[ServerlessResource]:
        """Every registered config."""
        with self._lock:
            return list(self._resources.values())

    def load(self, manifest: Manifest | Path | str) -> None:
        """Add the endpoints and functions of a manifest.

        Raises:
            ManifestError: the manifest is invalid or names an unknown resource class.
        """
        if not isinstance(manifest, Manifest):
            manifest = load_manifest(manifest)
        for name, entry in manifest.resources.items():
            try:
                resource = resource_from_config(entry.resource_type, name, entry.config)
            except ManifestError as exc:
                msg = f"manifest {exc}"
                raise ManifestError(msg) from exc
            self.register(resource)
            for entry_function in entry.functions:
                key = entry_function.name
                if entry_function.module and entry_function.qualname:
                    key = f"{entry_function.module}:{entry_function.qualname}"
                self.register_function(key, name)
                with self._lock:
                    self.manifest_functions[key] = name
        for function, endpoint in manifest.function_registry.items():
            self.register_function(function, endpoint)
            with self._lock:
                self.manifest_functions[function] = endpoint


def _difference(first: ServerlessResource, second: ServerlessResource) -> str:
    if type(first) is not type(second):
        return f"a {type(first).__name__} and a {type(second).__name__}"
    changed = [
        f"{field}={getattr(first, field)!r} vs {getattr(second, field)!r}"
        for field in first.__struct_fields__
        if getattr(first, field) != getattr(second, field)
    ]
    return "they differ in " + "; ".join(changed)


REGISTRY = Registry()
"""The process-wide registry that ``@remote`` fills."""
