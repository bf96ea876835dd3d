"""``python -m flash_actors.gateway``: see `flash_actors.gateway.daemon`."""

from flash_actors.gateway.daemon import main

main()
