"""The ``flash`` command line; it depends on the library, never the reverse."""

from __future__ import annotations

__all__: list[str] = []
