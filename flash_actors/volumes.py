"""Network volumes as a worker sees them, here and on RunPod; ``accelerate_downloads`` per job.

On RunPod, a network volume is mounted at ``/runpod-volume`` in every worker of an endpoint
that names it (``networkVolumeId=`` or ``networkVolume=``). The local provider keeps each
volume in a folder of its own on this machine
(`flash_actors.providers.local.volumes`), tells the worker where in ``FLASH_VOLUME_PATH``
(and the id in ``FLASH_VOLUME_ID``), and makes ``/runpod-volume`` point there when it can.
`volume_path` finds the volume in either place, so one function runs unchanged on both.

``accelerate_downloads`` (``@remote(..., accelerate_downloads=True)``, Flash's default) is
applied by the worker as each job starts (`apply_downloads`): model caches (Hugging Face's,
torch hub's) go to the endpoint's volume, where every endpoint naming the volume finds what
one of them fetched, and Hugging Face downloads use ``hf_transfer`` / ``hf_xet``'s
high-performance mode when the worker can import them. With ``accelerate_downloads=False``
the job sees the worker's environment as it was (the standard, inherited caches).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

from flash_actors.errors import ConfigurationError

__all__ = [
    "DOWNLOAD_ENV",
    "RUNPOD_VOLUME",
    "VOLUME_ID_ENV",
    "VOLUME_PATH_ENV",
    "apply_downloads",
    "volume_path",
]

RUNPOD_VOLUME = "/runpod-volume"
"""Where RunPod mounts an endpoint's network volume in its workers."""
VOLUME_PATH_ENV = "FLASH_VOLUME_PATH"
"""The worker's volume folder on this machine (set by the local provider)."""
VOLUME_ID_ENV = "FLASH_VOLUME_ID"
"""The worker's network volume id (set by the local provider)."""
DOWNLOAD_ENV = "FLASH_DOWNLOAD_ENV"
"""JSON object: the variables ``accelerate_downloads`` sets on this worker (model caches in
its volume), worked out by the local provider when it starts the worker."""

_FAST_TRANSFERS = (
    ("hf_transfer", "HF_HUB_ENABLE_HF_TRANSFER"),
    ("hf_xet", "HF_XET_HIGH_PERFORMANCE"),
)
"""Importable module, and the variable that makes Hugging Face downloads use it at full
speed (``hf_transfer`` for huggingface_hub before 1.0, ``hf_xet`` after)."""


def volume_path() -> Path:
    """The network volume of the worker this runs on, here or on RunPod.

    ``FLASH_VOLUME_PATH`` when set (a local worker: its volume's own folder, right even
    when ``/runpod-volume`` on this machine points at another endpoint's volume), else
    ``/runpod-volume`` when it exists (a RunPod worker).

    Raises:
        ConfigurationError: this process has no network volume (it is not a worker of an
            endpoint with ``networkVolumeId``).
    """
    local = os.environ.get(VOLUME_PATH_ENV)
    if local:
        return Path(local)
    if os.path.isdir(RUNPOD_VOLUME):
        return Path(RUNPOD_VOLUME)
    msg = (
        "no network volume here: volume_path() is for code running on a worker of an "
        "endpoint with a volume; give the endpoint networkVolumeId='<id>' (or "
        "networkVolume=NetworkVolume(...))"
    )
    raise ConfigurationError(msg)


_base: dict[str, str | None] = {}
"""The worker's own value (``None``: unset) of each variable `apply_downloads` changed."""
_transfers_found: set[str] = set()
_transfers_missing: dict[str, tuple[str, ...]] = {}
_download_env: tuple[str, dict[str, str]] = ("{}", {})
"""Modules not found, with the import path they were looked up on."""


def _accelerated() -> dict[str, str]:
    """What ``accelerate_downloads=True`` sets on this worker."""
    global _download_env
    raw = os.environ.get(DOWNLOAD_ENV) or "{}"
    if _download_env[0] != raw:  # parsed once per value, not per job
        _download_env = (raw, json.loads(raw))
    wanted = dict(_download_env[1])
    for module, variable in _FAST_TRANSFERS:
        # The module first: when it is missing (the usual case), the environment is not
        # read at all (a variable that is not set costs a raised KeyError to look up).
        if module not in _transfers_found:
            # Looked up again only when the import path changed (a job's dependencies
            # may bring it): a lookup costs ~0.2 ms, more than the rest of a small call.
            path = tuple(sys.path)
            if _transfers_missing.get(module) == path:
                continue
            if importlib.util.find_spec(module) is None:
                _transfers_missing[module] = path
                continue
            _transfers_found.add(module)
        if _base.get(variable, os.environ.get(variable)) is not None:
            continue  # the endpoint's or the user's own setting stands
        wanted[variable] = "1"
    return wanted


def apply_downloads(accelerate: bool) -> None:  # noqa: FBT001 (the request's flag)
    """Set this worker's environment for a job's ``accelerate_downloads`` (see the module).

    Called by the worker as each job starts, after its dependencies are importable (one of
    them may be ``hf_transfer``). The environment is the process's: while jobs with
    different settings overlap on one worker, the last one started holds, and a library
    that reads it once (huggingface_hub, when first imported) keeps what it read first.
    """
    wanted = _accelerated() if accelerate else {}
    if _base.keys() <= wanted.keys() and all(
        os.environ.get(name) == value for name, value in wanted.items()
    ):
        return  # as the last job left it: no putenv per job
    for name, value in wanted.items():
        if name not in _base:
            _base[name] = os.environ.get(name)
        os.environ[name] = value
    for name, saved in list(_base.items()):
        if name in wanted:
            continue
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved
        del _base[name]
