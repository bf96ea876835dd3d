"""The local gateway: RunPod's data plane and worker protocol on 127.0.0.1 (``flash local``).

- `store`: the durable SQLite queue; `core`: RunPod's job semantics over it;
- `server`: the HTTP routes; `workers`: handler-file worker processes; `launch`: their entry;
- `daemon`: the process ``flash local up`` starts; `record`: how scripts find it;
- `client`: the provider scripts use to send their calls to a running daemon.
"""
