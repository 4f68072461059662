"""Cached, resumable stages: a stage folder, the key of its settings and inputs, and the compute it spent.

A stage folder holds `key.json` while it runs and `stage.json` once finished. The key hashes the stage's
settings, the input files it reads and the keys of the stages it builds on: a finished stage with the same key
is reused, a changed one is moved aside to `<stage>.old/` and rerun. Compute is counted per stage (generated
tokens, forward-pass tokens, FLOPs, wall seconds summed over every run of the stage that ended, and the share of
the CPU other processes took meanwhile).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

from .files import json_digest, write_json
from .machine import cpu_counters, other_cpu_seconds

# What a method's compute sums over its stages.
COMPUTE_KEYS = ("generated_tokens", "forward_tokens", "flops", "wall_seconds")


def stage_key(inputs: dict) -> str:
    """16 hex digits of the stage's settings and inputs: a finished stage with the same key is reused."""
    return json_digest(inputs)


def read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def run_stage(directory: str, inputs: dict, body: Callable[[str], dict | None], label: str) -> dict:
    """Run `body(directory)` unless the stage finished with the same key; returns its stage record.

    `body` returns this run's compute (generated_tokens / forward_tokens it can count exactly over the whole
    stage); wall seconds are summed over every run of the stage that ended, killed runs excepted.
    """
    key = stage_key(inputs)
    record = read_json(os.path.join(directory, "stage.json"))
    if record and record.get("key") == key:
        print(f"[{label}] cached ({directory})", flush=True)
        return record
    ledger = os.path.join(directory, "key.json")
    started = read_json(ledger)
    if started is None or started.get("key") != key:
        if os.path.exists(directory):
            old = directory.rstrip("/") + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            print(f"[{label}] settings or inputs changed: previous outputs moved to {old}", flush=True)
        os.makedirs(directory)
        started = {"key": key, "inputs": inputs, "wall_seconds": 0.0, "cpu_seconds": 0.0, "other_cpu_seconds": 0.0}
        write_json(ledger, started)
        print(f"[{label}] running ({directory})", flush=True)
    else:
        print(f"[{label}] resuming ({directory})", flush=True)
    start, cpu_before = time.perf_counter(), cpu_counters()
    try:
        compute = dict(body(directory) or {})
    finally:  # an interrupted run's time still counts
        started["wall_seconds"] = round(started.get("wall_seconds", 0.0) + time.perf_counter() - start, 3)
        shared = other_cpu_seconds(cpu_before, cpu_counters())
        if shared is None or started.get("cpu_seconds") is None:  # not measurable, or a run from before the counter
            started["cpu_seconds"] = None
        else:
            started["other_cpu_seconds"] += shared[0]
            started["cpu_seconds"] += shared[1]
        write_json(ledger, started)
    compute["wall_seconds"] = started["wall_seconds"]
    # The share of the machine's CPU that other processes took meanwhile: above SHARED_CPU_THRESHOLD the wall
    # seconds are not a speed figure (the report says so). None when it could not be measured.
    compute["other_cpu_share"] = (round(started["other_cpu_seconds"] / started["cpu_seconds"], 3)
                                  if started.get("cpu_seconds") else None)
    record = {"key": key, "inputs": inputs, "compute": compute,
              "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    write_json(os.path.join(directory, "stage.json"), record)
    return record


def sum_compute(records: list[dict]) -> dict:
    total = {k: 0 for k in COMPUTE_KEYS}
    for record in records:
        for k in COMPUTE_KEYS:
            total[k] += record["compute"].get(k, 0) or 0
        total["wall_seconds"] += record["compute"].get("round_wall_seconds", 0)  # online: its rounds' time
    total["wall_seconds"] = round(total["wall_seconds"], 1)
    return total


def model_digest(path: str) -> dict:
    """The weight files' sizes and mtimes: cheap, and a re-converted or retrained model changes them."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith((".safetensors", ".json")):
            st = os.stat(os.path.join(path, name))
            out[name] = [st.st_size, int(st.st_mtime)]
    return out
