"""Two o_proj adapters side by side: the self-spec draft adapter (`linear_spec_lora/`) and the
denoise adapter of diffusion passes (`diffusion_lora/`). Each token takes the adapter its pass
names and no other; neither ever reaches a causal pass, so AR and self-spec output are unchanged."""

from __future__ import annotations

import random

import pytest
import torch

from replicas.engine import BatchEngine, DecodeParams, Engine, EngineConfig
from replicas.engine.kv_cache import KVCache
from replicas.engine.model import DENOISE_ADAPTER, DRAFT_ADAPTER, AttentionInputs
from replicas.engine.runner import ModelRunner
from replicas.engine.sequence import ForwardPass
from replicas.engine.testing import write_random_checkpoint

from .test_modes import brute_force_diffusion, random_prompt


@pytest.fixture(scope="module")
def two_adapter_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("nld") / "two", seed=3, lora_rank=8, denoise_lora_rank=8)


@pytest.fixture(scope="module")
def both(two_adapter_dir):
    return Engine.from_pretrained(two_adapter_dir)


def hidden(model, tokens: list[int], weight: float | None) -> torch.Tensor:
    t = len(tokens)
    m = torch.ones(1, 1, t, t, dtype=torch.bool)
    w = None if weight is None else torch.full((1, t), weight)
    with torch.no_grad():
        return model(torch.tensor([tokens]), torch.arange(t)[None], None, AttentionInputs(mask=m, lora_weight=w))


def test_each_token_takes_only_the_adapter_it_names(two_adapter_dir):
    only_draft = Engine.from_pretrained(two_adapter_dir, denoise_lora=False).model
    only_denoise = Engine.from_pretrained(two_adapter_dir, lora=False).model
    plain = Engine.from_pretrained(two_adapter_dir, lora=False, denoise_lora=False).model
    model = Engine.from_pretrained(two_adapter_dir).model
    assert model.has_adapter(DRAFT_ADAPTER) and model.has_adapter(DENOISE_ADAPTER)
    assert only_draft.has_lora and not only_draft.has_adapter(DENOISE_ADAPTER)
    assert not only_denoise.has_lora and only_denoise.has_adapter(DENOISE_ADAPTER)
    tokens = [1, 17, 23, 99, 5, 8, 100, 100]
    base = hidden(plain, tokens, None)
    torch.testing.assert_close(hidden(model, tokens, 0.0), base)
    torch.testing.assert_close(hidden(model, tokens, float(DRAFT_ADAPTER)), hidden(only_draft, tokens, float(DRAFT_ADAPTER)))
    torch.testing.assert_close(hidden(model, tokens, float(DENOISE_ADAPTER)),
                               hidden(only_denoise, tokens, float(DENOISE_ADAPTER)))
    assert not torch.allclose(hidden(model, tokens, float(DRAFT_ADAPTER)), base, atol=1e-4)
    assert not torch.allclose(hidden(model, tokens, float(DENOISE_ADAPTER)), base, atol=1e-4)
    assert not torch.allclose(hidden(model, tokens, float(DRAFT_ADAPTER)),
                              hidden(model, tokens, float(DENOISE_ADAPTER)), atol=1e-4)
    # an adapter the model lacks is no adapter; removing one keeps the other
    torch.testing.assert_close(hidden(only_draft, tokens, float(DENOISE_ADAPTER)), base)
    model.set_lora(None, DENOISE_ADAPTER)
    assert model.has_lora and not model.has_adapter(DENOISE_ADAPTER)
    torch.testing.assert_close(hidden(model, tokens, float(DRAFT_ADAPTER)), hidden(only_draft, tokens, float(DRAFT_ADAPTER)))
    with pytest.raises(ValueError, match="adapter"):
        model.set_lora(None, 3)


def test_diffusion_with_the_denoise_adapter_matches_the_brute_force_reference(both):
    assert both.has_lora and both.has_denoise_lora
    rng = random.Random(11)
    for threshold in (0.0, 0.3, 0.9):
        for _ in range(4):
            prompt = random_prompt(rng, both.config.vocab_size)
            block, n = rng.randint(2, both.config.block_size), rng.randint(1, 30)
            params = DecodeParams(mode="diffusion", max_new_tokens=n, block_length=block, threshold=threshold)
            got = both.generate(prompt, params)
            want, passes = brute_force_diffusion(both, prompt, n=n, block=block, threshold=threshold,
                                                 adapter=DENOISE_ADAPTER)
            assert got.token_ids == want and got.forward_passes == passes
            off = both.generate(prompt, params.with_(denoise_lora=False))
            assert off.token_ids == brute_force_diffusion(both, prompt, n=n, block=block, threshold=threshold)[0]


def test_the_denoise_adapter_changes_denoise_passes_only(two_adapter_dir, both):
    without = Engine.from_pretrained(two_adapter_dir, denoise_lora=False)
    rng = random.Random(5)
    for _ in range(6):
        prompt = random_prompt(rng, both.config.vocab_size)
        ar = both.generate(prompt, DecodeParams(mode="ar", max_new_tokens=24))
        assert ar.token_ids == without.generate(prompt, DecodeParams(mode="ar", max_new_tokens=24)).token_ids
        spec = both.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=24, block_length=6))
        assert spec.token_ids == ar.token_ids
        assert spec.accepted_lengths == without.generate(
            prompt, DecodeParams(mode="self_spec", max_new_tokens=24, block_length=6)).accepted_lengths
    cfg = both.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=24, head_dim=cfg.head_dim)
    runner = ModelRunner(both.model, cache)
    runner.run([(0, ForwardPass([1, 17, 23, 99], 0, True))])
    canvas = [7] + [cfg.mask_token_id] * 7
    outs = {a: runner.run([(0, ForwardPass(canvas, 4, False, lora=True, adapter=a))])[0]
            for a in (DRAFT_ADAPTER, DENOISE_ADAPTER)}
    plain = runner.run([(0, ForwardPass(canvas, 4, False))])[0]
    assert not torch.allclose(outs[DRAFT_ADAPTER], outs[DENOISE_ADAPTER], atol=1e-4)
    assert not torch.allclose(outs[DENOISE_ADAPTER], plain, atol=1e-4)


def run_together(be: BatchEngine, reqs: list[tuple[list[int], DecodeParams]]) -> list[list[int]]:
    """Submit every (prompt, params) to the batch engine at once, step until idle; each one's tokens."""
    ids = [be.submit(p, params) for p, params in reqs]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while be.has_work():
        for chunk in be.step():
            got[chunk.request_id].extend(chunk.token_ids)
    return [got[i] for i in ids]


def test_a_batch_mixing_drafts_and_canvases_matches_each_request_alone(both):
    """One forward holds self-spec drafts (draft adapter), diffusion canvases (denoise adapter)
    and AR tokens (none): every request's output is the one it gets alone."""
    rng = random.Random(2)
    reqs = []
    for i in range(9):
        mode = ("self_spec", "diffusion", "ar")[i % 3]
        reqs.append((random_prompt(rng, both.config.vocab_size),
                     DecodeParams(mode=mode, max_new_tokens=rng.randint(4, 20), block_length=rng.randint(2, 8),
                                  threshold=0.3)))
    alone = [both.generate(p, params).token_ids for p, params in reqs]
    be = BatchEngine(both, EngineConfig(max_batch_size=9, max_seq_len=128))
    assert run_together(be, reqs) == alone


def test_asking_for_a_missing_denoise_adapter_is_a_clear_error(two_adapter_dir):
    without = Engine.from_pretrained(two_adapter_dir, denoise_lora=False)
    assert not without.has_denoise_lora
    with pytest.raises(ValueError, match="denoise_lora: no denoise adapter"):
        without.generate([1, 2], DecodeParams(mode="diffusion", denoise_lora=True))
    with pytest.raises(FileNotFoundError):
        Engine.from_pretrained(write_random_checkpoint(two_adapter_dir.parent / "none", seed=4), denoise_lora=True)


def test_padded_static_buckets_apply_each_adapter_as_the_eager_runner(two_adapter_dir):
    """The CUDA-graph runner's static path (no capture on a CPU): buckets keyed by the adapters a
    pass uses give the eager runner's tokens for drafts, canvases and both in one batch."""
    from replicas.engine.graph_runner import CudaGraphRunner

    def static_runner(model, cache):
        return CudaGraphRunner(model, cache, max_batch=8, max_tokens=16, column_step=8, capture=False)

    eager = Engine.from_pretrained(two_adapter_dir, runner_cls=ModelRunner)
    padded = Engine.from_pretrained(two_adapter_dir, runner_cls=static_runner)
    rng = random.Random(9)
    for mode in ("self_spec", "diffusion", "self_spec", "diffusion"):
        prompt = random_prompt(rng, eager.config.vocab_size)
        params = DecodeParams(mode=mode, max_new_tokens=16, block_length=4, threshold=0.3, ignore_eos=True)
        assert padded.generate(prompt, params).token_ids == eager.generate(prompt, params).token_ids
    assert {key[3] for key in padded._runner.buckets} >= {(DRAFT_ADAPTER,), (DENOISE_ADAPTER,)}
    reqs = [(random_prompt(rng, eager.config.vocab_size), DecodeParams(
        mode=m, max_new_tokens=12, block_length=4, threshold=0.3, ignore_eos=True)) for m in ("self_spec", "diffusion")]
    be = BatchEngine(padded, EngineConfig(max_batch_size=2, max_seq_len=64))
    assert run_together(be, reqs) == [eager.generate(p, params).token_ids for p, params in reqs]
    assert (DRAFT_ADAPTER, DENOISE_ADAPTER) in {key[3] for key in be.runner.buckets}


def test_a_full_rank_adapter_is_applied_as_one_dense_delta(tmp_path, monkeypatch):
    """r (in + out) >= in * out: the model applies scale * B A as one matmul, which equals the
    factored delta up to rounding; a low-rank adapter stays factored."""
    from replicas.engine import model as model_mod

    full = write_random_checkpoint(tmp_path / "full", seed=5, lora_rank=64)  # in = 4 heads x 16 = 64
    dense = Engine.from_pretrained(full, denoise_lora=False).model
    assert len(dense.encoder.layers[0].self_attn.adapters[DRAFT_ADAPTER]) == 1
    monkeypatch.setattr(model_mod, "_delta", lambda a, b: (a, b))
    factored = Engine.from_pretrained(full, denoise_lora=False).model
    assert len(factored.encoder.layers[0].self_attn.adapters[DRAFT_ADAPTER]) == 2
    tokens = [1, 17, 23, 99, 5, 8, 100, 100]
    torch.testing.assert_close(hidden(dense, tokens, float(DRAFT_ADAPTER)),
                               hidden(factored, tokens, float(DRAFT_ADAPTER)), atol=1e-5, rtol=1e-4)
    monkeypatch.undo()
    low = Engine.from_pretrained(write_random_checkpoint(tmp_path / "low", seed=5, lora_rank=8)).model
    assert len(low.encoder.layers[0].self_attn.adapters[DRAFT_ADAPTER]) == 2
