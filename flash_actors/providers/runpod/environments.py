"""A Flash environment's endpoints, reconciled with the build deployed to it.

After ``deployBuildToEnvironment``, runpod-flash 1.21's ``flash deploy`` saves one endpoint per
resource of the build itself (RunPod starts nothing on its own); `reconcile` does the same,
against RunPod or ``flash local`` alike (both answer the same GraphQL):

- each endpoint is named as its resource and saved with ``flashEnvironmentId`` and, in its
  env, ``FLASH_RESOURCE_NAME``, ``FLASH_APP``, ``FLASH_ENV`` and ``FLASH_ENVIRONMENT_ID`` (its
  workers find the environment's other resources through them), ``FLASH_SECRET`` (the app's
  secret for this environment, `environment_secret`: the resources sign their calls to each
  other with keys derived from it) and the build's source fingerprint;
- a resource whose config and source are the same as in the environment's previous build,
  and which has its endpoint, is left alone (its workers keep running); a changed one is
  updated in place (same endpoint id: ``saveEndpoint`` with ``id``, then ``saveTemplate``);
  a new one is created; the endpoint of a resource the build no longer has is scaled to
  zero and deleted (runpod-flash leaves those running).

Every step is one GraphQL request, which the control plane applies whole. A deploy cut off
halfway leaves each endpoint either as it was or as the new build wants it, and running it
again converges: endpoints are found by environment and resource, never created twice.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from flash_actors.build.manifest import RESOURCE_ENV
from flash_actors.errors import FlashRuntimeError
from flash_actors.providers.runpod.provisioning import (
    endpoint_input,
    remove_endpoint,
    update_endpoint,
    without_flashboot_suffix,
)
from flash_actors.registry import resource_from_config

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from flash_actors.providers.runpod.graphql import ControlPlane

__all__ = ["Reconciled", "environment_secret", "plan", "reconcile", "resource_of"]

FINGERPRINT_ENV = "_FLASH_SOURCE_FINGERPRINT"
"""runpod-flash's env key for the build's source fingerprint (a code change is a change)."""


def plan(old: Any, new: Any) -> dict[str, list[str]]:
    """What deploying manifest ``new`` over ``old`` does, by resource name.

    A resource is unchanged when its manifest entry and the build's source fingerprint are
    both the same (the fingerprint covers every source file: a code change updates all).
    """
    before = _resources(old)
    after = _resources(new)
    same_source = _fingerprint(old) == _fingerprint(new)
    kept = sorted(set(before) & set(after))

    def key(config: Any) -> str:
        return json.dumps(config, sort_keys=True, default=str)

    unchanged = [n for n in kept if same_source and key(before[n]) == key(after[n])]
    return {
        "add": sorted(set(after) - set(before)),
        "update": [n for n in kept if n not in unchanged],
        "remove": sorted(set(before) - set(after)),
        "unchanged": unchanged,
    }


def _resources(manifest: Any) -> dict[str, Any]:
    resources = manifest.get("resources") if isinstance(manifest, dict) else None
    return resources if isinstance(resources, dict) else {}


def _fingerprint(manifest: Any) -> Any:
    return manifest.get("source_fingerprint") if isinstance(manifest, dict) else None


def environment_secret(api_key: str, environment_id: str) -> str:
    """The app's secret in one environment (hex): derived from the account's API key.

    Whoever holds the API key can change the endpoints anyway; deriving the secret from it
    gives every deploy of the environment the same one with nothing stored.
    """
    return hmac.digest(
        api_key.encode(),
        b"flash-actors/environment\x00" + environment_id.encode(),
        "sha256",
    ).hex()


def resource_of(endpoint: Mapping[str, Any]) -> str:
    """The resource an environment's endpoint serves.

    ``FLASH_RESOURCE_NAME`` in its env, else its name less FlashBoot's ``-fb``.
    """
    template = endpoint.get("template")
    pairs = template.get("env") if isinstance(template, dict) else None
    for pair in pairs if isinstance(pairs, list) else []:
        if isinstance(pair, dict) and pair.get("key") == RESOURCE_ENV:
            return str(pair.get("value") or "")
    return without_flashboot_suffix(str(endpoint.get("name") or ""))


@dataclass
class Reconciled:
    """What `reconcile` did: resource names by action, and each resource's endpoint id."""

    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    endpoints: dict[str, str] = field(default_factory=dict)


async def reconcile(
    cp: ControlPlane,
    *,
    app_name: str,
    environment: Mapping[str, Any],
    manifest: Mapping[str, Any],
    previous: Any,
    progress: Callable[[str], None] | None = None,
) -> Reconciled:
    """Save, update or delete ``environment``'s endpoints to run ``manifest``'s resources.

    Args:
        cp: the control plane (RunPod's, or ``flash local``'s).
        app_name: the Flash app.
        environment: the environment (``id``, ``name``), its build already deployed.
        manifest: the deployed build's manifest.
        previous: the manifest of the build the environment ran before (None: none).
        progress: told each step as it starts.

    Raises:
        ManifestError: a resource's config in the manifest does not load.
        ConfigurationError: it cannot run there.
        FlashRuntimeError: a request failed (the endpoints done so far stay done).
    """
    say = progress or (lambda _line: None)
    environment_id = str(environment["id"])
    changes = plan(previous, manifest)
    wanted = {
        name: entry
        for name, entry in _resources(manifest).items()
        if isinstance(entry, dict) and entry.get("functions")
    }
    existing: dict[str, dict[str, Any]] = {}
    extra: list[dict[str, Any]] = []  # a second endpoint of one resource
    for endpoint in await cp.find_endpoints():
        if endpoint.get("flashEnvironmentId") == environment_id:
            if resource_of(endpoint) in existing:
                extra.append(endpoint)
            else:
                existing[resource_of(endpoint)] = endpoint
    secret = environment_secret(cp.api_key, environment_id)
    fingerprint = _fingerprint(manifest)
    done = Reconciled()
    for name, entry in sorted(wanted.items()):
        have = existing.get(name)
        if have is not None and name in changes["unchanged"]:
            done.unchanged.append(name)
            done.endpoints[name] = str(have["id"])
            continue
        config = entry.get("config")
        resource = resource_from_config(
            str(entry.get("resource_type") or ""),
            name,
            config if isinstance(config, dict) else {},
        )
        env = {
            **(resource.env or {}),
            RESOURCE_ENV: name,
            "FLASH_APP": app_name,
            "FLASH_ENV": str(environment.get("name") or ""),
            "FLASH_ENVIRONMENT_ID": environment_id,
            "FLASH_SECRET": secret,
        }
        if fingerprint:
            env[FINGERPRINT_ENV] = str(fingerprint)
        if entry.get("is_load_balanced"):
            env["FLASH_ENDPOINT_TYPE"] = "lb"
        resource = msgspec.structs.replace(resource, env=env)
        desired = endpoint_input(
            resource, api_key=cp.api_key, environment_id=environment_id
        )
        if have is None:
            say(f"creating the endpoint of {name}")
            saved = await cp.save_endpoint(desired)
            done.added.append(name)
        else:
            say(f"updating the endpoint of {name}")
            saved = await update_endpoint(cp, have, desired)
            done.updated.append(name)
        if not saved.get("id"):
            msg = f"saving the endpoint of {name!r}: the answer has no endpoint id"
            raise FlashRuntimeError(msg)
        done.endpoints[name] = str(saved["id"])
    for name, endpoint in sorted(existing.items()):
        if name not in wanted:
            say(f"removing the endpoint of {name} (the build no longer has it)")
            await remove_endpoint(cp, str(endpoint["id"]))
            done.removed.append(name)
    for endpoint in extra:
        name = resource_of(endpoint)
        say(f"removing a second endpoint of {name} ({endpoint['id']})")
        await remove_endpoint(cp, str(endpoint["id"]))
    return done
