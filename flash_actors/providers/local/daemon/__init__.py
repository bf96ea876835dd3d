"""The ``flash local`` daemon: RunPod's data plane and worker protocol on 127.0.0.1.

``python -m flash_actors.providers.local.daemon`` runs it (`serve`).

- `store`: the durable SQLite queue; `jobs`: every job and every change of its state;
- `catalog`: the registered endpoints and the checks on their configs;
- `dataplane`: client operations; `worker_protocol`: stock workers' operations;
- `dispatch`: Flash jobs to the local worker pools; `webhooks`; `janitor`: TTLs, timeouts,
  retention; `gateway`: `Gateway`, composing them, and the endpoints' lifecycle;
- `server`: the HTTP routes; `workers`: handler-file worker processes; `launch`: their entry;
- `serve`: the process ``flash local up`` starts; `record`: how scripts find it.

Scripts send their calls to it with `flash_actors.providers.local.daemon_client`.
"""
