"""`NLDModel.fuse_projections`: each layer's q/k/v and gate/up weights stacked into one matmul
each, as the engine loads a model. Same values, same outputs (up to float rounding), the same
greedy tokens in every mode; the checkpoint's layout stays trainable."""

from __future__ import annotations

import torch

from replicas.engine import DecodeParams, Engine
from replicas.engine.loader import load_lora, load_model
from replicas.engine.model import DRAFT_ADAPTER, AttentionInputs


def causal(t: int, rows: int = 2) -> torch.Tensor:
    return torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(rows, 1, t, t)


def test_fusing_stacks_the_weights_drops_the_parts_and_is_idempotent(ckpt_dir):
    plain, fused = load_model(ckpt_dir), load_model(ckpt_dir)
    fused.fuse_projections()
    fused.fuse_projections()  # a second call changes nothing
    for a, b in zip(plain.encoder.layers, fused.encoder.layers, strict=True):
        want = torch.cat([a.self_attn.q_proj.weight, a.self_attn.k_proj.weight, a.self_attn.v_proj.weight])
        assert torch.equal(b.self_attn.qkv_proj.weight, want)
        assert torch.equal(b.mlp.gate_up_proj.weight, torch.cat([a.mlp.gate_proj.weight, a.mlp.up_proj.weight]))
        assert not any(hasattr(b.self_attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert not any(hasattr(b.mlp, n) for n in ("gate_proj", "up_proj"))
    names = {n for n, _ in fused.named_parameters()}
    assert "encoder.layers.0.self_attn.qkv_proj.weight" in names and "encoder.layers.0.mlp.gate_up_proj.weight" in names
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())


def test_a_fused_model_computes_what_the_checkpoints_layout_does_adapter_passes_included(lora_ckpt_dir):
    plain, fused = load_model(lora_ckpt_dir), load_model(lora_ckpt_dir)
    fused.fuse_projections()
    for m in (plain, fused):
        m.set_lora(load_lora(lora_ckpt_dir / "linear_spec_lora", m.config, "cpu", torch.float32), DRAFT_ADAPTER)
    tokens = torch.randint(0, plain.config.vocab_size, (2, 9))
    positions = torch.arange(9).expand(2, 9)
    lora = torch.zeros(2, 9)
    lora[1, 4:] = DRAFT_ADAPTER  # the second row's last tokens take the draft adapter
    with torch.inference_mode():
        for attn in (AttentionInputs(mask=causal(9)), AttentionInputs(mask=causal(9), lora_weight=lora)):
            want = plain.logits(plain(tokens, positions, None, attn))
            got = fused.logits(fused(tokens, positions, None, attn))
            assert torch.allclose(want, got, atol=1e-5, rtol=1e-5)


def test_the_engine_loads_fused_and_decodes_the_same_tokens_as_the_checkpoints_layout(lora_ckpt_dir):
    fused = Engine.from_pretrained(lora_ckpt_dir)
    kept = Engine.from_pretrained(lora_ckpt_dir, fuse_projections=False)
    assert fused.model.encoder.layers[0].self_attn.qkv_proj is not None
    assert kept.model.encoder.layers[0].self_attn.qkv_proj is None and hasattr(kept.model.encoder.layers[0].mlp, "up_proj")
    for prompt in ([5, 6, 7], [9, 3, 3, 8, 1, 4]):
        for mode in ("ar", "self_spec", "diffusion"):
            params = DecodeParams(mode=mode, max_new_tokens=12, ignore_eos=True)
            assert fused.generate(prompt, params).token_ids == kept.generate(prompt, params).token_ids, (prompt, mode)


def test_the_checkpoints_layout_still_trains(ckpt_dir):
    model = load_model(ckpt_dir)
    model.requires_grad_(True)
    tokens = torch.randint(0, model.config.vocab_size, (2, 6))
    loss = model.logits(model(tokens, torch.arange(6).expand(2, 6), None, AttentionInputs(mask=causal(6)))).logsumexp(-1).mean()
    loss.backward()
    attn, mlp = model.encoder.layers[0].self_attn, model.encoder.layers[0].mlp
    for p in (attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, mlp.gate_proj.weight, mlp.up_proj.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
