"""Encoding call arguments to the wire form and back, against runpod-flash's own functions.

For a 1 KB dict, a 1 MB and a 7 MB bytes object and a 7 MB float64 numpy array, measures:

- ours: `RequestSigner.sign` (cloudpickle, keyed BLAKE3, base64) and `decode_request`
  (base64 validate+decode, MAC check, unpickle);
- theirs: ``runpod_flash.runtime.serialization.serialize_args`` / ``deserialize_arg``
  (needs the ``bench`` extra: ``pip install -e '.[bench]'``); ``rt x`` is their encode plus
  decode over ours;
- the floor in the same run, from its parts measured alone on the pickled payload: a memory
  copy (pickling or unpickling bytes), a pybase64 encode or decode, and the keyed BLAKE3 MAC.
  Encode floor = copy + base64 encode + MAC; decode floor = base64 decode + MAC + copy
  (``enc/floor`` above 1 means the encode overlapped its MAC with its base64).

Run: ``python benchmarks/bench_serialization.py [-n ROUNDS] [--json]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import pybase64
from blake3 import blake3

from flash_actors.messages import FunctionRequest
from flash_actors.serialization import RequestSigner, decode_request, endpoint_key


def _payloads() -> dict[str, Any]:
    payloads: dict[str, Any] = {
        "1KB dict": {f"key{i}": i * 1.5 for i in range(50)},
        "1MB bytes": bytes(1024 * 1024),
        "7MB bytes": bytes(7 * 1024 * 1024),
    }
    try:
        import numpy as np

        payloads["7MB float64"] = np.random.default_rng(0).random(7 * 1024 * 1024 // 8)
    except ImportError:  # numpy comes with the bench extra
        pass
    return payloads


def _time(fn: Callable[[], Any], rounds: int) -> float:
    """Median seconds of one call over ``rounds`` calls (after one warm-up)."""
    fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run(rounds: int) -> list[dict[str, Any]]:
    key = endpoint_key("bench")
    signer = RequestSigner(
        key, FunctionRequest(function_name="f", function_code="def f(x): ...")
    )
    try:
        from runpod_flash.runtime.serialization import deserialize_arg, serialize_args
    except ImportError:
        serialize_args = deserialize_arg = None
    rows = []
    for label, value in _payloads().items():
        request = signer.sign((value,), {})
        text = request.args[0]
        raw = pybase64.b64decode(text)
        row: dict[str, Any] = {"payload": label, "wire_bytes": len(text)}
        row["ours_encode_s"] = _time(lambda: signer.sign((value,), {}), rounds)
        row["ours_decode_s"] = _time(lambda: decode_request(request, key), rounds)
        row["memcpy_s"] = _time(lambda: bytearray(raw), rounds)
        row["b64_encode_s"] = _time(lambda: pybase64.b64encode_as_string(raw), rounds)
        row["b64_decode_s"] = _time(
            lambda: pybase64.b64decode(text, validate=True), rounds
        )
        row["mac_s"] = _time(lambda: blake3(raw, key=key).digest(), rounds)
        row["encode_floor_s"] = row["memcpy_s"] + row["b64_encode_s"] + row["mac_s"]
        row["decode_floor_s"] = row["b64_decode_s"] + row["mac_s"] + row["memcpy_s"]
        row["encode_fraction_of_floor"] = row["encode_floor_s"] / row["ours_encode_s"]
        row["decode_fraction_of_floor"] = row["decode_floor_s"] / row["ours_decode_s"]
        if serialize_args is not None and deserialize_arg is not None:
            theirs = serialize_args((value,))
            row["flash_encode_s"] = _time(lambda: serialize_args((value,)), rounds)
            row["flash_decode_s"] = _time(lambda: deserialize_arg(theirs[0]), rounds)
            row["encode_speedup"] = row["flash_encode_s"] / row["ours_encode_s"]
            row["decode_speedup"] = row["flash_decode_s"] / row["ours_decode_s"]
            row["round_trip_speedup"] = (
                row["flash_encode_s"] + row["flash_decode_s"]
            ) / (row["ours_encode_s"] + row["ours_decode_s"])
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="rounds per measurement")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args()
    rows = run(args.n)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(
        f"{'payload':<13}{'ours enc':>10}{'ours dec':>10}{'flash enc':>11}{'flash dec':>11}"
        f"{'enc x':>7}{'dec x':>7}{'rt x':>7}{'memcpy':>9}{'b64 enc':>9}{'b64 dec':>9}"
        f"{'mac':>9}{'enc/floor':>11}{'dec/floor':>11}"
    )
    for r in rows:

        def ms(key: str, row: dict[str, Any] = r) -> str:
            return f"{row[key] * 1e3:.3f}" if key in row else "-"

        def ratio(key: str, row: dict[str, Any] = r) -> str:
            return f"{row[key]:.1f}" if key in row else "-"

        print(
            f"{r['payload']:<13}{ms('ours_encode_s'):>10}{ms('ours_decode_s'):>10}"
            f"{ms('flash_encode_s'):>11}{ms('flash_decode_s'):>11}{ratio('encode_speedup'):>7}"
            f"{ratio('decode_speedup'):>7}{ratio('round_trip_speedup'):>7}"
            f"{ms('memcpy_s'):>9}{ms('b64_encode_s'):>9}{ms('b64_decode_s'):>9}{ms('mac_s'):>9}"
            f"{r['encode_fraction_of_floor']:>11.2f}{r['decode_fraction_of_floor']:>11.2f}"
        )
    print(
        "times in ms (median); enc x / dec x / rt x = runpod-flash time / ours (rt: encode"
    )
    print(
        "plus decode); enc/floor, dec/floor = (memcpy + base64 + MAC, each alone) / ours"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
