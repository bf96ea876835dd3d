"""``python -m flash_actors.providers.local.daemon``: see `flash_actors.providers.local.daemon.serve`."""

from flash_actors.providers.local.daemon.serve import main

main()
