"""Where the RunPod provider finds its API key and URLs, the way runpod-flash finds them.

The API key comes from the first of:

1. the ``RUNPOD_API_KEY`` environment variable;
2. ``RUNPOD_API_KEY`` in the nearest ``.env`` file, searched from the working directory
   upwards (python-dotenv's ``find_dotenv(usecwd=True)``, as Flash loads it);
3. ``api_key`` under ``[default]`` in ``~/.runpod/config.toml`` (runpod-python's ``runpod
   config`` writes it; runpodctl's top-level ``apikey`` is read when there is no
   ``[default]``).

Empty or blank values count as unset. The URLs come from ``RUNPOD_API_BASE_URL`` (control
plane, default ``https://api.runpod.io``; GraphQL at ``{base}/graphql``) and
``RUNPOD_ENDPOINT_BASE_URL`` (data plane, default ``https://api.runpod.ai/v2``), each from the
environment, then from ``.env``. A value that is not an http or https URL with a host, or
has a malformed port, raises `ConfigurationError`: a typo never silently reaches production.
Setting one URL variable but not the other logs a ``runpod.urls.partial`` warning (usually a
forgotten variable; ``RUNPOD_URL_MIXED_OK=1`` silences it, as in runpod-flash).

The key is never logged, and `RunPodSettings`'s ``repr`` hides it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import dotenv_values, find_dotenv

from flash_actors._logging import get_logger
from flash_actors.errors import ConfigurationError

__all__ = [
    "API_BASE_URL_ENV",
    "API_KEY_ENV",
    "DEFAULT_API_BASE_URL",
    "DEFAULT_ENDPOINT_BASE_URL",
    "ENDPOINT_BASE_URL_ENV",
    "RunPodSettings",
    "config_file",
    "find_api_key",
    "load_settings",
    "validate_url",
]

log = get_logger(__name__)

API_KEY_ENV = "RUNPOD_API_KEY"
API_BASE_URL_ENV = "RUNPOD_API_BASE_URL"
ENDPOINT_BASE_URL_ENV = "RUNPOD_ENDPOINT_BASE_URL"
DEFAULT_API_BASE_URL = "https://api.runpod.io"
DEFAULT_ENDPOINT_BASE_URL = "https://api.runpod.ai/v2"
_TRUTHY = frozenset({"1", "true", "yes", "on"})


def config_file() -> Path:
    """``~/.runpod/config.toml``, runpod-python's credentials file."""
    return Path.home() / ".runpod" / "config.toml"


@dataclass(frozen=True, kw_only=True)
class RunPodSettings:
    """What the RunPod provider needs to reach RunPod.

    Attributes:
        api_key: the API key (hidden from ``repr``).
        api_base_url: the control plane's base URL (no trailing slash).
        endpoint_base_url: the data plane's base URL, ``{endpoint_base_url}/{id}/run``.
        api_key_source: where the key was found (``"environment"``, the ``.env`` path or
            the config file's path), for messages.
    """

    api_key: str = field(repr=False)
    api_base_url: str = DEFAULT_API_BASE_URL
    endpoint_base_url: str = DEFAULT_ENDPOINT_BASE_URL
    api_key_source: str = "environment"

    @property
    def graphql_url(self) -> str:
        """``{api_base_url}/graphql``."""
        return f"{self.api_base_url}/graphql"


def _dotenv() -> tuple[str, dict[str, str | None]]:
    """The nearest ``.env`` from the working directory up, and its values (empty if none)."""
    path = find_dotenv(usecwd=True)
    if not path:
        return "", {}
    return path, dict(dotenv_values(path))


def _lookup(name: str, dotenv: dict[str, str | None]) -> str | None:
    """``name`` from the environment, then from ``.env``; blank values count as unset."""
    for value in (os.environ.get(name), dotenv.get(name)):
        if value is not None and value.strip():
            return value.strip()
    return None


def _key_from_config(path: Path) -> str | None:
    """The API key in runpod-python's config file, or ``None``.

    Raises:
        ConfigurationError: the file exists but is not valid TOML.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        msg = f"cannot read {path}: {exc.strerror or exc}"
        raise ConfigurationError(msg) from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        msg = f"{path} is not valid TOML ({exc}): fix it, or set {API_KEY_ENV}"
        raise ConfigurationError(msg) from exc
    profile = document.get("default")
    candidate = (
        profile.get("api_key") if isinstance(profile, dict) else document.get("apikey")
    )
    if isinstance(candidate, str) and candidate.strip():
        return candidate.strip()
    return None


def find_api_key() -> tuple[str, str]:
    """The RunPod API key and where it was found (see the module docstring for the order).

    Returns:
        ``(key, source)``: source is ``"environment"``, the ``.env`` file's path, or the
        config file's path.

    Raises:
        ConfigurationError: no key in any of the three places, or the config file cannot
            be read.
    """
    value = os.environ.get(API_KEY_ENV)
    if value is not None and value.strip():
        return value.strip(), "environment"
    dotenv_path, dotenv = _dotenv()
    value = dotenv.get(API_KEY_ENV)
    if value is not None and value.strip():
        return value.strip(), dotenv_path
    path = config_file()
    key = _key_from_config(path)
    if key is not None:
        return key, str(path)
    msg = (
        f"no RunPod API key: set {API_KEY_ENV} in the environment, in a .env file in the "
        f"working directory, or as api_key under [default] in {path} (`runpod config`)"
    )
    raise ConfigurationError(msg)


def validate_url(value: str, name: str) -> str:
    """``value`` without a trailing slash, checked to be an http or https URL with a host.

    Args:
        value: the URL as given.
        name: the variable it came from, for the message.

    Raises:
        ConfigurationError: not http/https, no host, or a malformed port.
    """
    stripped = value.strip().rstrip("/")
    parts = urlsplit(stripped)
    if parts.scheme not in ("http", "https") or not parts.netloc or not parts.hostname:
        msg = (
            f"{name}={value!r} is not a valid http or https URL "
            f"(scheme={parts.scheme!r}, host={parts.netloc!r}): write it as "
            "https://host[:port][/path]"
        )
        raise ConfigurationError(msg)
    try:
        _ = parts.port
    except ValueError as exc:
        msg = f"{name}={value!r} has a malformed port ({exc})"
        raise ConfigurationError(msg) from exc
    return stripped


def load_settings() -> RunPodSettings:
    """Read the API key and both URLs (environment, then ``.env``; see the module docstring).

    Raises:
        ConfigurationError: no API key anywhere, or a URL variable is not a valid URL.
    """
    _, dotenv = _dotenv()
    api_base = _lookup(API_BASE_URL_ENV, dotenv)
    endpoint_base = _lookup(ENDPOINT_BASE_URL_ENV, dotenv)
    api_base_url = (
        validate_url(api_base, API_BASE_URL_ENV) if api_base else DEFAULT_API_BASE_URL
    )
    endpoint_base_url = (
        validate_url(endpoint_base, ENDPOINT_BASE_URL_ENV)
        if endpoint_base
        else DEFAULT_ENDPOINT_BASE_URL
    )
    mixed_ok = (_lookup("RUNPOD_URL_MIXED_OK", dotenv) or "").lower()
    if (api_base is None) != (endpoint_base is None) and mixed_ok not in _TRUTHY:
        log.warning(
            "runpod.urls.partial",
            overridden=API_BASE_URL_ENV if api_base else ENDPOINT_BASE_URL_ENV,
            at_default=ENDPOINT_BASE_URL_ENV if api_base else API_BASE_URL_ENV,
            hint="set both (RUNPOD_URL_MIXED_OK=1 silences this)",
        )
    key, source = find_api_key()
    return RunPodSettings(
        api_key=key,
        api_base_url=api_base_url,
        endpoint_base_url=endpoint_base_url,
        api_key_source=source,
    )
