"""The client of a ``flash local`` daemon (`client`); the daemon is `flash_actors.providers.local.daemon`."""
