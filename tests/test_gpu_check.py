"""The GPU check script, run end to end on the CPU with a tiny model of SmolLM2's architecture (CI smoke test)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_stage_on_cpu(smollm2_path, tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--model-dir", smollm2_path,
                             "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                            capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for stage in ("peak", "model", "features", "precision", "probe", "sampling", "rerank", "dpo", "eval", "summary"):
        assert re.search(rf"^\[{stage}\] ", out, re.M), f"no [{stage}] line:\n{out}"
    for goal in ("ratio_features", "ratio_sampling", "ratio_dpo", "fraction_peak_features", "fraction_peak_dpo"):
        value = re.search(rf"^{goal}=([0-9.]+)$", out, re.M)
        assert value and float(value.group(1)) > 0, goal
    assert "precision ok" in out
    assert (tmp_path / "gpu_check.txt").read_text().splitlines()[-1].startswith("[summary]")
