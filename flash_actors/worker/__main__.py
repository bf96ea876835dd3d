"""``python -m flash_actors.worker``: one worker process (see `flash_actors.worker.server`)."""

from __future__ import annotations

from flash_actors.worker.server import main

if __name__ == "__main__":
    main()
