"""Every example runs as a plain script (no runtime block: the implicit runtime) and says
what the seeds say it should."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EXPECTED = {
    "quick_start.py": ["{'sum': 15, 'mean': 3}"],
    "local_testing.py": ["{'status': 'ok', 'items': 3}"],
    "parallel_execution.py": ["[1, 4, 9]", "328350"],
    "trio_app.py": ["[0, 2, 4, 6, 8, 10, 12, 14, 16, 18]"],
    "error_handling.py": [
        "Failed: ValueError: invalid literal for int() with base 10: 'not a number'",
        "Error: RemoteExecutionError[ValueError] True: invalid literal for int() with base 10: 'nope'",
    ],
    "load_balancer.py": ["{'result': 5}", "{'status': 'ok'}"],
    "class_endpoint.py": ["16"],
    "pipeline.py": ["{'result': 6.0}"],
    "dependencies.py": ["123.5 MB"],
    "handler_endpoint.py": [
        "COMPLETED {'label': 'positive', 'score': 2}",
        "COMPLETED {'label': 'negative', 'score': -2}",
    ],
    "embedded_aiohttp.py": ["{'text': 'hello remote world', 'words': 3}", "[1, 2, 3]"],
    "embedded_fastapi.py": ["{'text': 'hello remote world', 'words': 3}", "[1, 2, 3]"],
    # either machine: a CUDA driver answers, or the remote OSError comes back (no hang)
    "gpu_check.py": [
        r"re:(CUDA devices: \d+|no CUDA here: OSError: libcuda\.so\.1: cannot open .*)"
    ],
}


def test_every_example_is_checked() -> None:
    assert {p.name for p in EXAMPLES.glob("*.py")} == set(EXPECTED)
    assert {p.name for p in (EXAMPLES / "handlers").glob("*.py")} == {"sentiment.py"}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONWARNINGS": "error::Warning"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    expected = EXPECTED[name]
    assert len(lines) == len(expected), proc.stdout + proc.stderr
    for line, want in zip(lines, expected, strict=True):
        if want.startswith("re:"):
            assert re.fullmatch(want[3:], line), line
        else:
            assert line == want
    assert proc.stderr == ""
