"""`cpu_linears.py`: the forward's linear shapes come from the model's config, and every layout is timed."""

from __future__ import annotations

from benchmarks.cpu_linears import linear_shapes, time_matmuls
from replicas.engine.cpu_linear import onednn_available
from replicas.engine.testing import write_random_checkpoint


def test_shapes_and_layouts(tmp_path):
    shapes = linear_shapes(write_random_checkpoint(tmp_path / "m"))  # 2 layers, hidden 64, 4 x 16 query, 2 x 16 kv, 128 mlp, 512 vocab
    assert shapes[:7] == [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    assert len(shapes) == 2 * 7 + 1 and shapes[-1] == (512, 64)
    t = time_matmuls(shapes[:3], rows=4, reps=1, passes=3)
    assert set(t) == {"row-major (nn.Linear)", "column-major"} | ({"oneDNN packed"} if onednn_available() else set())
    assert all(v > 0 for v in t.values())
