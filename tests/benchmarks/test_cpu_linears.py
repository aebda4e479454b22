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


def test_fused_shapes_and_the_settings_the_engine_ab_takes(tmp_path):
    import pytest

    from benchmarks.cpu_linears import AB_SETTINGS, engine_ab

    model = write_random_checkpoint(tmp_path / "m")
    fused = linear_shapes(model, fused=True)  # q/k/v stacked: 64 + 2 x 32 rows; gate/up: 2 x 128
    assert fused[:4] == [(128, 64), (64, 64), (256, 64), (64, 128)]
    assert len(fused) == 2 * 4 + 1 and fused[-1] == (512, 64)
    assert AB_SETTINGS == ("onednn_linears", "fuse_projections")
    with pytest.raises(ValueError, match="setting"):
        engine_ab(model, [1], 1, 0.1, "cuda_graphs")
