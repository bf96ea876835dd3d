"""`flash build`'s parts, which read a project without running it.

- `flash_actors.build.scanner`: finds ``@remote`` functions and classes and their resource
  configs by parsing the sources (`scan_project`).
- `flash_actors.build.manifest`: the versioned ``.flash/flash_manifest.json`` schema,
  `write_manifest` and `load_manifest`.
- `flash_actors.build.builder`: `build_project`, the whole pipeline to the archive.
- `flash_actors.build.preview`: `run_preview`, the built archive run here
  (``flash build --preview``).

This package imports nothing at import time, so workers that only read a manifest stay light.
"""
