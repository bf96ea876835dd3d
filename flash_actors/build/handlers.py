"""The handler factory: one small generated handler file per resource of a build.

Interface only for now (issue 11, item 3): `write_handlers` is filled in by the deployed-code
work; until then a build carries no handler files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from flash_actors.build.manifest import Manifest

__all__ = ["write_handlers"]


def write_handlers(manifest: Manifest, build_dir: Path) -> list[Path]:
    """Write one handler file per resource of ``manifest`` into ``build_dir``.

    Returns the paths written, relative to ``build_dir``, sorted.
    """
    del manifest, build_dir
    return []
