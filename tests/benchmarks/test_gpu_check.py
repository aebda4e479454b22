"""`benchmarks/gpu_check.py` is the one script a session with a lent GPU runs (15 minutes of
device time, no second try to spare): its `--small` smoke run on the CPU walks the same code paths
(the CUDA-graph runner's static buffers without capture, every mode, the identity checks), so a
stale attribute or a broken import fails here, not on the GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_a_cpu_with_small_shapes(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--small", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["errors"] == []
    assert r["lora_params"] == 8 * (4 * 32 + 128) * 2  # rank x (inner + hidden) x layers of the small shapes
    identity = r["fp32_identity"]
    assert identity["self_spec_equals_ar_eager"] is True
    assert all(v is True for k, v in identity.items() if k.startswith("quadratic_") and k.endswith(("_eager", "_graphs")))
