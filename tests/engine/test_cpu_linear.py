"""Float32 CPU linear layers (`cpu_linear`): same values as `nn.Linear`, MKL for one row, oneDNN's
packed weights for several, the engine's greedy output unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from replicas.engine import DecodeParams, Engine, EngineConfig, load_batch_engine
from replicas.engine import cpu_linear
from replicas.engine.cpu_linear import CpuLinear, onednn_available, prepare_cpu_linears
from replicas.engine.loader import load_model
from replicas.engine.model import AttentionInputs

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")


@pytest.fixture
def packed_calls(monkeypatch):
    calls = []
    real = cpu_linear.packed_matmul

    def spy(x, packed):
        calls.append(tuple(x.shape))
        return real(x, packed)

    monkeypatch.setattr(cpu_linear, "packed_matmul", spy)
    return calls


@needs_onednn
def test_one_row_takes_mkl_several_rows_the_packed_weight(packed_calls):
    torch.manual_seed(0)
    plain = nn.Linear(64, 96, bias=False)
    fast = CpuLinear(plain, packed=True)
    assert fast.weight.shape == (96, 64) and fast.weight.stride() == (1, 96)  # column-major, same shape
    assert torch.equal(fast.weight, plain.weight)
    with torch.inference_mode():
        one = torch.randn(1, 1, 64)
        assert torch.allclose(fast(one), plain(one), atol=1e-6, rtol=1e-5)  # the GEMV path
        assert packed_calls == []
        many = torch.randn(2, 5, 64)
        assert torch.allclose(fast(many), plain(many), atol=1e-5, rtol=1e-5)
        assert packed_calls == [(2, 5, 64)]
        strided = torch.randn(5, 2, 64).transpose(0, 1)  # not contiguous
        assert torch.allclose(fast(strided), plain(strided), atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            fast.weight[3] += 1.0  # an in-place edit reaches the packed copy too
            plain.weight[3] += 1.0
        assert torch.allclose(fast(many), plain(many), atol=1e-5, rtol=1e-5)
    unpacked = CpuLinear(plain, packed=False)
    assert unpacked.packed is None
    with torch.inference_mode():
        assert torch.equal(unpacked(many), nn.functional.linear(many, unpacked.weight))
    assert len(packed_calls) == 3
    with pytest.raises(ValueError, match="no bias"):
        CpuLinear(nn.Linear(4, 4), packed=True)


def test_the_cpu_engine_gets_them_with_the_same_weights_and_greedy_output(ckpt_dir):
    plain = load_model(ckpt_dir)
    engine = Engine.from_pretrained(ckpt_dir)
    fused = load_model(ckpt_dir)
    fused.fuse_projections()  # what the engine loads: q/k/v and gate/up stacked
    layers = [m for m in engine.model.modules() if isinstance(m, CpuLinear)]
    assert len(layers) == len([m for m in fused.modules() if isinstance(m, nn.Linear)])
    assert all((m.packed is not None) == onednn_available() for m in layers)
    for (name, a), (name_b, b) in zip(fused.named_parameters(), engine.model.named_parameters(), strict=True):
        assert name == name_b and torch.equal(a, b), name  # same names, shapes and values
    tokens = torch.randint(0, plain.config.vocab_size, (2, 7))
    positions = torch.arange(7).expand(2, 7)
    mask = torch.ones(7, 7, dtype=torch.bool).tril()[None, None].expand(2, 1, 7, 7)
    with torch.inference_mode():
        want = plain.logits(plain(tokens, positions, None, AttentionInputs(mask=mask)))
        got = engine.model.logits(engine.model(tokens, positions, None, AttentionInputs(mask=mask)))
    assert torch.allclose(want, got, atol=1e-4, rtol=1e-4)
    reference = Engine(plain)  # nn.Linear throughout (a model passed in is not changed)
    for prompt in ([5, 6, 7], [9, 3, 3, 8, 1]):
        ar = reference.generate(prompt, DecodeParams(mode="ar", max_new_tokens=16, ignore_eos=True)).token_ids
        for mode in ("ar", "self_spec"):
            assert engine.generate(prompt, DecodeParams(mode=mode, max_new_tokens=16, ignore_eos=True)).token_ids == ar


def test_the_switch_and_what_is_left_alone(ckpt_dir):
    be = load_batch_engine(ckpt_dir, EngineConfig(max_batch_size=2, max_seq_len=64, onednn_linears=False))
    assert all(m.packed is None for m in be.engine.model.modules() if isinstance(m, CpuLinear))
    bf16 = Engine.from_pretrained(ckpt_dir, dtype="bfloat16")
    assert not any(isinstance(m, CpuLinear) for m in bf16.model.modules())  # float32 only
    tied = load_model(ckpt_dir)
    tied.diffusion_head.weight = tied.encoder.embed_tokens.weight
    linears = len([m for m in tied.modules() if isinstance(m, nn.Linear)])
    assert prepare_cpu_linears(tied) == linears - 1  # the tied head stays one matrix
    assert isinstance(tied.diffusion_head, nn.Linear)
