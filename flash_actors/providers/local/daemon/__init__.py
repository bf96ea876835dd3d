"""The ``flash local`` daemon: RunPod's data plane and worker protocol on 127.0.0.1.

``python -m flash_actors.providers.local.daemon`` runs it (`serve`).

- `store`: the durable SQLite queue; `core`: RunPod's job semantics over it;
- `server`: the HTTP routes; `workers`: handler-file worker processes; `launch`: their entry;
- `serve`: the process ``flash local up`` starts; `record`: how scripts find it.

Scripts send their calls to it with `flash_actors.gateway.client`.
"""
