"""Send hand-built Flash FunctionRequests with the stock `runpod` client; print one JSON result.

Usage: ``stock_flash_client.py ENDPOINT CASES.json``. CASES maps a name to a job body
(``{"input": FunctionRequest}``), each sent with ``run_sync``. The answer for each name is
``{"run_sync": output}``; when ``run_sync`` gives None (the job did not complete), the body is
sent once more with ``run`` and its status read with the same client (``status``, ``error``,
``retries``); ``{"http": code, "body": ...}`` when the daemon refused the request.
Run with RUNPOD_ENDPOINT_BASE_URL and RUNPOD_API_KEY set (the package reads them at import).
"""

import json
import os
import sys

import requests
import runpod

runpod.api_key = os.environ["RUNPOD_API_KEY"]
name = sys.argv[1]
endpoint = runpod.Endpoint(name)
with open(sys.argv[2]) as cases:
    todo = json.load(cases)

out = {}
for case, body in todo.items():
    try:
        output = endpoint.run_sync(body, timeout=60)
    except requests.HTTPError as exc:
        out[case] = {"http": exc.response.status_code, "body": exc.response.json()}
        continue
    out[case] = {"run_sync": output}
    if output is None:
        job = endpoint.run(body)
        job.output(timeout=60)  # waits for a final state
        state = endpoint.rp_client.get(f"{name}/status/{job.job_id}")
        out[case].update(
            status=state["status"],
            error=state.get("error"),
            retries=state.get("retries"),
        )
print(json.dumps(out))
