"""The model's logits against independent references: Hugging Face's Ministral3 and a full
recompute without incremental caching."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from replicas.engine.kv_cache import KVCache
from replicas.engine.runner import ModelRunner
from replicas.engine.sequence import ForwardPass


def hf_reference(ckpt_dir):
    transformers = pytest.importorskip("transformers")
    raw = json.loads((ckpt_dir / "config.json").read_text())
    cfg = transformers.Ministral3Config(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"], intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"], num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["num_key_value_heads"], head_dim=raw["head_dim"],
        max_position_embeddings=raw["max_position_embeddings"], rms_norm_eps=raw["rms_norm_eps"],
        rope_parameters=dict(raw["rope_parameters"]), tie_word_embeddings=False,
        bos_token_id=raw["bos_token_id"], eos_token_id=raw["eos_token_id"], pad_token_id=0,
    )
    cfg._attn_implementation = "eager"
    model = transformers.Ministral3ForCausalLM(cfg).eval()
    state = load_file(str(ckpt_dir / "model.safetensors"))
    renamed = {k.replace("encoder.", "model.", 1).replace("diffusion_head", "lm_head"): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    return model


def full_logits(engine, tokens: list[int], *, causal: bool = True) -> torch.Tensor:
    """Logits [T, V] of one pass over `tokens` from position 0 with a fresh cache."""
    cfg = engine.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=len(tokens), head_dim=cfg.head_dim)
    return ModelRunner(engine.model, cache).run([(0, ForwardPass(tokens, 0, causal))])[0]


def test_causal_logits_match_transformers_ministral3(engine, ckpt_dir):
    ref = hf_reference(ckpt_dir)
    g = torch.Generator().manual_seed(0)
    for length in (1, 7, 40):
        ids = torch.randint(0, engine.config.vocab_size, (1, length), generator=g)
        with torch.no_grad():
            expected = ref(input_ids=ids).logits[0].float()
        ours = full_logits(engine, ids[0].tolist())
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_llama4_scale_and_yarn_far_positions_match_transformers(engine, ckpt_dir):
    """Positions past original_max_position_embeddings exercise the Llama-4 query scale."""
    ref = hf_reference(ckpt_dir)
    orig = engine.config.rope.original_max_position_embeddings
    ids = torch.tensor([[5, 6, 7, 8]])
    pos = torch.tensor([[orig - 2, orig - 1, orig, 2 * orig + 3]])
    with torch.no_grad():
        expected = ref(input_ids=ids, position_ids=pos).logits[0].float()
    cfg = engine.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=8, head_dim=cfg.head_dim)
    from replicas.engine.model import AttentionGroup, AttentionInputs

    mask = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None]
    # slot 0 of a contiguous cache: block 0, so column c is flat location c
    attn = AttentionInputs(write_index=torch.arange(4)[None], groups=(AttentionGroup(0, 1, 4, cache.tables[:1, :1], mask),))
    with torch.no_grad():
        ours = engine.model.logits(engine.model(ids, pos, cache, attn))[0]
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=0)


def test_incremental_kv_decoding_matches_full_recompute(engine):
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, engine.config.vocab_size, (30,), generator=g).tolist()
    full = full_logits(engine, tokens)  # [30, V]
    cfg = engine.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=32, head_dim=cfg.head_dim)
    runner = ModelRunner(engine.model, cache)
    pieces = [runner.run([(0, ForwardPass(tokens[:10], 0, True))])[0]]
    for i in range(10, 22):  # one token at a time
        pieces.append(runner.run([(0, ForwardPass([tokens[i]], i, True))])[0])
    pieces.append(runner.run([(0, ForwardPass(tokens[22:], 22, True))])[0])  # a block of 8
    torch.testing.assert_close(torch.cat(pieces), full, atol=1e-5, rtol=0)


def test_bidirectional_pass_reads_cache_but_does_not_change_it(engine):
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, engine.config.vocab_size, (20,), generator=g).tolist()
    cfg = engine.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=32, head_dim=cfg.head_dim)
    runner = ModelRunner(engine.model, cache)
    runner.run([(0, ForwardPass(tokens[:12], 0, True))])
    prefix_k = cache.k[:, :, :12].clone()  # [layers, blocks, columns, kv_heads, head_dim]
    canvas = tokens[12:]
    bidir = runner.run([(0, ForwardPass(canvas, 12, False))])[0]
    assert torch.equal(cache.k[:, :, :12], prefix_k)
    # a bidirectional canvas sees its later tokens: the result differs from the causal pass
    causal = full_logits(engine, tokens)[12:]
    assert not torch.allclose(bidir, causal, atol=1e-3)
    # and equals a recompute where the canvas rows attend to the whole canvas
    from replicas.engine.model import AttentionGroup, AttentionInputs

    mask = torch.tril(torch.ones(20, 20, dtype=torch.bool))
    mask[12:, 12:] = True
    fresh = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=20, head_dim=cfg.head_dim)
    group = AttentionGroup(0, 1, 20, fresh.tables[:1, :1], mask[None, None])
    attn = AttentionInputs(write_index=torch.arange(20)[None], groups=(group,))
    with torch.no_grad():
        ref = engine.model.logits(engine.model(torch.tensor([tokens]), torch.arange(20)[None], fresh, attn))[0]
    torch.testing.assert_close(bidir, ref[12:], atol=1e-5, rtol=0)
