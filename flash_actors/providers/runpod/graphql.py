"""The RunPod control plane: GraphQL over a `Transport`, failures mapped onto our errors.

`ControlPlane.execute` posts ``{"query", "variables"}`` to ``{api_url}/graphql`` with Bearer
auth and returns the answer's ``data``. How failures surface:

- HTTP 401 or 403, or a GraphQL error saying the caller is unauthorized or
  unauthenticated: `ConfigurationError`, one line naming ``RUNPOD_API_KEY`` and the URL.
- HTTP 429 or 5xx, a GraphQL error RunPod marks as transient ("try again later", "too many
  requests", ...), or a server that cannot be reached: `DeliveryError`; the caller retries
  by its policy (nothing here retries).
- Any other GraphQL error: `GraphQLMutationError` for a mutation, `GraphQLQueryError` for a
  query, carrying the server's messages.

Nothing here logs variables or headers (they hold the API key).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, cast

import msgspec

from flash_actors._logging import get_logger
from flash_actors.errors import (
    ConfigurationError,
    DeliveryError,
    GraphQLError,
    GraphQLMutationError,
    GraphQLQueryError,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from flash_actors.providers.runpod.transport import Transport

__all__ = [
    "DELETE_ENDPOINT",
    "DELETE_TEMPLATE",
    "LIST_ENDPOINTS",
    "SAVE_ENDPOINT",
    "SAVE_TEMPLATE",
    "ControlPlane",
]

log = get_logger(__name__)

SAVE_ENDPOINT = (
    "mutation saveEndpoint($input: EndpointInput!) { saveEndpoint(input: $input) { "
    "aiKey gpuIds id idleTimeout locations name networkVolumeId networkVolumeIds { "
    "networkVolumeId dataCenterId } flashEnvironmentId scalerType scalerValue templateId "
    "type userId version workersMax workersMin workersStandby workersPFBTarget gpuCount "
    "allowedCudaVersions minCudaVersion executionTimeoutMs instanceIds activeBuildid "
    "idePodId flashBootType } }"
)
"""runpod-flash 1.21's ``saveEndpoint`` mutation, selection set and all."""

SAVE_TEMPLATE = (
    "mutation saveTemplate($input: SaveTemplateInput) { saveTemplate(input: $input) { "
    "id containerDiskInGb dockerArgs env { key value } imageName name readme } }"
)
"""runpod-flash 1.21's ``saveTemplate`` mutation (it updates a template when given ``id``)."""

DELETE_ENDPOINT = "mutation deleteEndpoint($id: String!) { deleteEndpoint(id: $id) }"
"""runpod-flash 1.21's ``deleteEndpoint`` mutation."""

DELETE_TEMPLATE = (
    "mutation deleteTemplate($templateName: String!) "
    "{ deleteTemplate(templateName: $templateName) }"
)
"""``deleteTemplate`` by name, as runpod-python sends it."""

LIST_ENDPOINTS = (
    "query myEndpoints { myself { endpoints { id name templateId gpuIds gpuCount "
    "instanceIds idleTimeout locations networkVolumeId scalerType scalerValue workersMin "
    "workersMax executionTimeoutMs type flashBootType flashEnvironmentId template { id "
    "name imageName "
    "containerDiskInGb dockerArgs env { key value } } } } }"
)
"""The account's endpoints with what `ensure_endpoint` compares (``myself { endpoints }``)."""

_TRANSIENT = (
    "try again later",
    "internal server error",
    "service unavailable",
    "too many requests",
    "temporarily unavailable",
)
"""GraphQL error messages runpod-flash 1.21 treats as transient (it retries them)."""

_UNAUTHORIZED = re.compile(r"unauthori[sz]ed|unauthenticated|invalid api key", re.I)
_AUTH_CODES = frozenset({"UNAUTHENTICATED", "UNAUTHORIZED", "FORBIDDEN"})
_OPERATION = re.compile(r"^\s*(query|mutation)\b\s*(\w*)", re.I)

_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


def _operation(query: str) -> tuple[bool, str]:
    """``(is_mutation, name)`` of a GraphQL document (name ``"query"`` when anonymous)."""
    match = _OPERATION.match(query)
    if match is None:
        return False, "query"
    return match[1].lower() == "mutation", match[2] or match[1].lower()


def _messages(errors: list[Any]) -> str:
    texts = [
        str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors
    ]
    return "; ".join(texts) or "unknown error"


def _unauthorized(errors: list[Any]) -> bool:
    for error in errors:
        if not isinstance(error, dict):
            continue
        code = (error.get("extensions") or {}).get("code")
        if code in _AUTH_CODES or _UNAUTHORIZED.search(str(error.get("message", ""))):
            return True
    return False


class ControlPlane:
    """A client of RunPod's GraphQL API (`execute` plus typed helpers).

    Args:
        transport: how requests travel (`HttpsTransport`, or a test transport).
        api_url: the control plane's base URL, ``RUNPOD_API_BASE_URL``; requests go to
            ``{api_url}/graphql`` (a URL already ending in ``/graphql`` is used as is).
        api_key: the RunPod API key, sent as ``Authorization: Bearer <key>``.
        timeout_s: the longest wait for one answer (runpod-flash uses 300 s).
    """

    def __init__(
        self,
        transport: Transport,
        api_url: str,
        api_key: str,
        *,
        timeout_s: float = 300.0,
    ) -> None:
        base = api_url.rstrip("/")
        self.url = base if base.endswith("/graphql") else f"{base}/graphql"
        self.transport = transport
        self.api_key = api_key
        self.timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"ControlPlane(url={self.url!r})"

    async def execute(
        self, query: str, variables: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Send one GraphQL operation and return the answer's ``data``.

        Raises:
            ConfigurationError: the API key was rejected (names ``RUNPOD_API_KEY``).
            DeliveryError: HTTP 429 or 5xx, a transient GraphQL error, or no answer.
            GraphQLMutationError: a mutation failed (the server's messages).
            GraphQLQueryError: a query failed (the server's messages).
        """
        is_mutation, name = _operation(query)
        failure: type[GraphQLError] = (
            GraphQLMutationError if is_mutation else GraphQLQueryError
        )
        body = _encoder.encode({"query": query, "variables": dict(variables or {})})
        headers = {
            "Authorization": f"Bearer {self.api_key}",
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        response = await self.transport.request(
            "POST", self.url, body=body, headers=headers, timeout_s=self.timeout_s
        )
        log.debug("runpod.graphql", operation=name, status=response.status)
        if response.status in (401, 403):
            msg = (
                f"RunPod rejected the API key (HTTP {response.status} from {self.url}): "
                "check RUNPOD_API_KEY (environment, .env or ~/.runpod/config.toml)"
            )
            raise ConfigurationError(msg)
        try:
            answer: Any = _decoder.decode(response.body)
        except msgspec.DecodeError:
            answer = None
        errors = answer.get("errors") if isinstance(answer, dict) else None
        if response.status == 429 or response.status >= 500:
            detail = _messages(errors) if errors else f"HTTP {response.status}"
            msg = (
                f"{name} at {self.url}: RunPod answered HTTP {response.status} "
                f"({detail}); retry later"
            )
            raise DeliveryError(msg)
        if errors:
            errors = errors if isinstance(errors, list) else [errors]
            text = _messages(errors)
            if _unauthorized(errors):
                msg = (
                    f"RunPod rejected the API key ({text}) at {self.url}: check "
                    "RUNPOD_API_KEY (environment, .env or ~/.runpod/config.toml)"
                )
                raise ConfigurationError(msg)
            if any(pattern in text.lower() for pattern in _TRANSIENT):
                msg = f"{name} at {self.url}: {text}; retry later"
                raise DeliveryError(msg)
            msg = f"{name} failed: {text}"
            raise failure(msg)
        if response.status >= 400 or not isinstance(answer, dict):
            snippet = response.body[:200].decode("utf-8", "replace")
            msg = f"{name} failed: HTTP {response.status} from {self.url}: {snippet!r}"
            raise failure(msg)
        data = answer.get("data")
        if not isinstance(data, dict):
            msg = f"{name} failed: the answer from {self.url} has no data"
            raise failure(msg)
        return data

    async def save_endpoint(self, endpoint_input: Mapping[str, Any]) -> dict[str, Any]:
        """``saveEndpoint``: create an endpoint, or update the one whose ``id`` is given.

        With ``id`` RunPod replaces every field, so ``endpoint_input`` must be complete.
        Returns the saved endpoint.
        """
        data = await self.execute(SAVE_ENDPOINT, {"input": dict(endpoint_input)})
        return self._object(data, "saveEndpoint")

    async def save_template(self, template_input: Mapping[str, Any]) -> dict[str, Any]:
        """``saveTemplate``: create a template, or update the one whose ``id`` is given."""
        data = await self.execute(SAVE_TEMPLATE, {"input": dict(template_input)})
        return self._object(data, "saveTemplate")

    async def find_endpoints(self) -> list[dict[str, Any]]:
        """Every endpoint of the account (``myself { endpoints { ... } }``)."""
        data = await self.execute(LIST_ENDPOINTS)
        myself = data.get("myself")
        endpoints = myself.get("endpoints") if isinstance(myself, dict) else None
        if not isinstance(endpoints, list):
            msg = f"myEndpoints failed: the answer from {self.url} has no endpoint list"
            raise GraphQLQueryError(msg)
        return [e for e in endpoints if isinstance(e, dict)]

    async def delete_endpoint(self, endpoint_id: str) -> None:
        """``deleteEndpoint``; RunPod refuses it while workersMin or workersMax is not 0."""
        await self.execute(DELETE_ENDPOINT, {"id": endpoint_id})

    async def delete_template(self, template_name: str) -> None:
        """``deleteTemplate`` by name (refused while an endpoint uses the template)."""
        await self.execute(DELETE_TEMPLATE, {"templateName": template_name})

    async def scale_to_zero(self, endpoint: Mapping[str, Any]) -> dict[str, Any]:
        """Set an endpoint's workersMin and workersMax to 0 (before `delete_endpoint`).

        Args:
            endpoint: the endpoint as `find_endpoints` returns it; its fields are sent back
                unchanged (``saveEndpoint`` with ``id`` replaces every field) but for the
                worker counts.
        """
        fields = (
            "id",
            "name",
            "templateId",
            "gpuIds",
            "gpuCount",
            "instanceIds",
            "idleTimeout",
            "locations",
            "networkVolumeId",
            "scalerType",
            "scalerValue",
            "executionTimeoutMs",
            "type",
            "flashBootType",
            "flashEnvironmentId",
        )
        update = {k: endpoint[k] for k in fields if endpoint.get(k) is not None}
        if not update.get("instanceIds"):
            update.pop("instanceIds", None)
        update["workersMin"] = 0
        update["workersMax"] = 0
        return await self.save_endpoint(update)

    def _object(self, data: dict[str, Any], field: str) -> dict[str, Any]:
        value = data.get(field)
        if not isinstance(value, dict):
            msg = f"{field} failed: the answer from {self.url} has no {field} object"
            raise GraphQLMutationError(msg)
        return cast("dict[str, Any]", value)
