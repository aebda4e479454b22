"""Decoding modes: self-spec == AR greedy, diffusion == a cache-free brute force, NFE accounting."""

from __future__ import annotations

import random

import pytest
import torch

from replicas.engine import DecodeParams
from replicas.engine.model import AttentionInputs


def random_prompt(rng: random.Random, vocab: int, mask_id: int = 100) -> list[int]:
    return [t if t != mask_id else t + 1 for t in (rng.randrange(vocab) for _ in range(rng.randint(1, 24)))]


@pytest.mark.parametrize("fixture", ["engine", "lora_engine"])
def test_greedy_self_spec_equals_ar(fixture, request):
    engine = request.getfixturevalue(fixture)
    rng = random.Random(fixture)
    for trial in range(24):
        prompt = random_prompt(rng, engine.config.vocab_size)
        block = rng.randint(2, engine.config.block_size)
        n = rng.randint(1, 40)
        ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=n))
        spec = engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=n, block_length=block))
        assert spec.token_ids == ar.token_ids, (trial, prompt, block)
        assert spec.finish_reason == ar.finish_reason
        assert all(0 <= c <= block - 1 for c in spec.accepted_lengths)


def test_lora_changes_drafts_not_output(lora_engine):
    """The adapter is live in draft passes (acceptance changes) yet verified output is AR's."""
    prompt = [1, 17, 23, 99, 5, 8]
    on = lora_engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=48, draft_lora=True))
    off = lora_engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=48, draft_lora=False))
    ar = lora_engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=48))
    assert on.token_ids == off.token_ids == ar.token_ids
    from replicas.engine.sequence import ForwardPass
    from replicas.engine.kv_cache import KVCache
    from replicas.engine.runner import ModelRunner

    cfg = lora_engine.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=1, num_kv_heads=cfg.num_key_value_heads,
                    max_len=16, head_dim=cfg.head_dim)
    runner = ModelRunner(lora_engine.model, cache)
    runner.run([(0, ForwardPass(prompt, 0, True))])
    canvas = [7] + [cfg.mask_token_id] * 7
    with_lora = runner.run([(0, ForwardPass(canvas, len(prompt), False, lora=True))])[0]
    without = runner.run([(0, ForwardPass(canvas, len(prompt), False, lora=False))])[0]
    assert not torch.allclose(with_lora, without, atol=1e-4)


def test_the_batchs_greedy_tokens_are_each_rows_own(tmp_path):
    """`run_with_greedy` picks every item's last-position token in one batched argmax: the same
    token `greedy_token` picks from that item's logits alone, the mask token banned even where
    it leads, for prefill, one-token and all-logits canvas passes in one forward."""
    from replicas.engine import Engine
    from replicas.engine.kv_cache import KVCache
    from replicas.engine.runner import ModelRunner
    from replicas.engine.sampling import greedy_token
    from replicas.engine.sequence import ForwardPass
    from replicas.engine.testing import write_random_checkpoint

    engine = Engine.from_pretrained(write_random_checkpoint(tmp_path / "m", seed=5))
    cfg = engine.config
    cache = KVCache(num_layers=cfg.num_hidden_layers, num_slots=3, num_kv_heads=cfg.num_key_value_heads,
                    max_len=32, head_dim=cfg.head_dim)
    runner = ModelRunner(engine.model, cache)
    runner.run([(1, ForwardPass([3, 4, 5, 6], 0, True)), (2, ForwardPass([9, 8], 0, True))])
    items = [(0, ForwardPass([1, 17, 23, 99, 5], 0, True, all_logits=False)),  # a prefill
             (1, ForwardPass([7], 4, True, all_logits=False)),  # an AR step
             (2, ForwardPass([11] + [cfg.mask_token_id] * 5, 2, False))]  # a canvas, every position's logits
    for boost in (0.0, 8.0):  # 8: the mask token leads on most rows
        engine.model.diffusion_head.weight[cfg.mask_token_id] += boost
        logits, greedy = runner.run_with_greedy(items)
        assert [len(lg) for lg in logits] == [1, 1, 6]
        assert greedy == [greedy_token(lg[-1:], cfg.mask_token_id) for lg in logits]
        assert cfg.mask_token_id not in greedy
    assert any(int(lg[-1].argmax()) == cfg.mask_token_id for lg in logits)  # the ban was exercised


def test_prompts_one_after_another_match_each_alone(engine):
    rng = random.Random(7)
    prompts = [random_prompt(rng, engine.config.vocab_size) for _ in range(6)]
    alone = [engine.generate(p, DecodeParams(mode="ar", max_new_tokens=20)).token_ids for p in prompts]
    mixed = []
    for i, p in enumerate(prompts):
        mode = ("self_spec", "ar", "diffusion")[i % 3]
        engine.generate(prompts[(i + 1) % len(prompts)], DecodeParams(mode="diffusion", max_new_tokens=9))
        mixed.append(engine.generate(p, DecodeParams(mode=mode if mode != "diffusion" else "ar", max_new_tokens=20)).token_ids)
    assert mixed == alone


def brute_force_diffusion(engine, prompt: list[int], *, n: int, block: int, threshold: float,
                          adapter: int = 0) -> tuple[list[int], int]:
    """The diffusion algorithm recomputing every pass from scratch with no KV cache.

    Each pass runs the whole sequence [prompt, committed blocks, canvas] with a mask that is
    causal over the committed part and, for a denoise pass, bidirectional over the canvas, whose
    tokens (only) take the o_proj adapter `adapter` (0: none)."""
    cfg = engine.config
    mask_id, eos = cfg.mask_token_id, set(cfg.eos_token_ids)

    def run(tokens, bidir_from):
        t = len(tokens)
        m = torch.tril(torch.ones(t, t, dtype=torch.bool))
        weight = torch.zeros(1, t)
        if bidir_from is not None:
            m[bidir_from:, bidir_from:] = True
            weight[0, bidir_from:] = float(adapter)
        attn = AttentionInputs(write_index=torch.zeros(1, t, dtype=torch.long), mask=m[None, None],
                               lora_weight=weight if adapter else None)
        with torch.no_grad():
            h = engine.model(torch.tensor([tokens]), torch.arange(t)[None], None, attn)
            logits = engine.model.logits(h)[0]
        logits[:, mask_id] = float("-inf")
        return logits

    seq = list(prompt)
    out: list[int] = []
    seed = int(run(seq, None)[-1].argmax())
    passes = 0
    while True:
        out.append(seed)
        if seed in eos or len(out) >= n:
            return out, passes
        canvas = [seed] + [mask_id] * (block - 1)
        start = len(seq)
        done = False
        while mask_id in canvas:
            probs = run(seq + canvas, start)[start:].softmax(-1)
            passes += 1
            idx = [i for i, t in enumerate(canvas) if t == mask_id]
            conf, cand = probs[idx].max(-1)
            best = int(conf.argmax())
            for j, i in enumerate(idx):
                if conf[j] >= threshold or j == best:
                    canvas[i] = int(cand[j])
            # emit the contiguous revealed prefix; stop at EOS or the token limit
            k = len(out) - (len(seq) - len(prompt))  # tokens of this canvas already emitted
            while k < block and canvas[k] != mask_id:
                out.append(canvas[k])
                k += 1
                if out[-1] in eos or len(out) >= n:
                    done = True
                    break
            if done:
                return out, passes
        seq = seq + canvas
        logits = run(seq, None)
        passes += 1
        seed = int(logits[-1].argmax())


@pytest.mark.parametrize("threshold", [0.0, 0.05, 0.9, 1.0])
def test_diffusion_matches_brute_force_reference(engine, threshold):
    rng = random.Random(int(threshold * 100))
    for _ in range(5):
        prompt = random_prompt(rng, engine.config.vocab_size)
        block = rng.randint(2, engine.config.block_size)
        n = rng.randint(1, 30)
        got = engine.generate(prompt, DecodeParams(mode="diffusion", max_new_tokens=n, block_length=block,
                                                   threshold=threshold))
        want, passes = brute_force_diffusion(engine, prompt, n=n, block=block, threshold=threshold)
        assert got.token_ids == want
        assert got.forward_passes == passes


def test_nfe_accounting(engine):
    prompt = [1, 2, 3, 4]
    ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=17, ignore_eos=True))
    assert len(ar.token_ids) == 17 and ar.forward_passes == 16  # the first token comes from prefill
    spec = engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=17, block_length=4, ignore_eos=True))
    assert spec.forward_passes == 2 * len(spec.accepted_lengths)
    assert sum(c + 1 for c in spec.accepted_lengths) >= 16  # each cycle emits c drafts + 1
    diff = engine.generate(prompt, DecodeParams(mode="diffusion", max_new_tokens=17, block_length=4,
                                                threshold=0.5, ignore_eos=True))
    full_blocks = len(diff.denoise_passes)  # blocks that were committed
    in_last = diff.forward_passes - sum(diff.denoise_passes) - full_blocks  # denoise passes of the final block
    assert 0 <= in_last <= 3
    assert diff.forward_passes == sum(diff.denoise_passes) + full_blocks + in_last
    assert all(1 <= p <= 3 for p in diff.denoise_passes)
    zero = engine.generate(prompt, DecodeParams(mode="diffusion", max_new_tokens=17, block_length=4,
                                                threshold=0.0, ignore_eos=True))
    assert all(p == 1 for p in zero.denoise_passes)  # threshold 0 reveals a whole canvas per pass
    assert zero.tokens_per_forward > ar.tokens_per_forward


def test_stop_token_ids_and_eos(engine):
    prompt = [1, 2, 3, 4]
    for mode in ("ar", "self_spec", "diffusion"):
        params = DecodeParams(mode=mode, max_new_tokens=30, ignore_eos=True, threshold=0.0)
        base = engine.generate(prompt, params).token_ids
        stop = base[5]
        out = engine.generate(prompt, params.with_(stop_token_ids=(stop,)))
        assert out.finish_reason == "stop"
        assert out.token_ids == base[: base.index(stop) + 1]


def test_eos_from_config_stops_every_mode(tmp_path):
    from replicas.engine import Engine
    from replicas.engine.testing import write_random_checkpoint

    engine = Engine.from_pretrained(write_random_checkpoint(tmp_path / "eos", seed=4))
    eos = engine.config.eos_token_ids[0]
    engine.model.diffusion_head.weight[eos] += 0.6  # make EOS likely, but not always first
    for mode in ("ar", "self_spec", "diffusion"):
        out = engine.generate([1, 2, 3], DecodeParams(mode=mode, max_new_tokens=40))
        assert out.finish_reason == "stop" and out.token_ids[-1] == eos
        assert eos not in out.token_ids[:-1]
        longer = engine.generate([1, 2, 3], DecodeParams(mode=mode, max_new_tokens=40, ignore_eos=True))
        assert longer.finish_reason == "length" and len(longer.token_ids) == 40


def test_mask_token_is_never_emitted(tmp_path):
    """A head that prefers the mask token everywhere still never yields it."""
    from replicas.engine import Engine
    from replicas.engine.testing import write_random_checkpoint

    d = write_random_checkpoint(tmp_path / "m", seed=3)
    engine = Engine.from_pretrained(d)
    engine.model.diffusion_head.weight[100] += 5.0  # boost the mask logit
    for mode in ("ar", "self_spec", "diffusion"):
        for temperature in (0.0, 1.0):
            out = engine.generate([1, 2, 3], DecodeParams(mode=mode, max_new_tokens=24, temperature=temperature, seed=1))
            assert 100 not in out.token_ids


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda e: e.generate([], DecodeParams()), "prompt is empty"),
        (lambda e: e.generate([1, 512], DecodeParams()), "outside the vocabulary"),
        (lambda e: e.generate([1, -1], DecodeParams()), "outside the vocabulary"),
        (lambda e: DecodeParams(max_new_tokens=0), "max_new_tokens"),
        (lambda e: DecodeParams(block_length=1), "block_length"),
        (lambda e: e.generate([1], DecodeParams(mode="self_spec", block_length=9)), "above the configured limit"),
        (lambda e: DecodeParams(threshold=1.5), "threshold"),
        (lambda e: DecodeParams(threshold=-0.1), "threshold"),
        (lambda e: DecodeParams(mode="beam"), "unknown decoding mode"),
        (lambda e: DecodeParams(temperature=-0.5), "temperature"),
        (lambda e: DecodeParams(top_p=0.0), "top_p"),
        (lambda e: e.generate([1], DecodeParams(draft_lora=True)), "no LoRA adapter"),
        (lambda e: e.generate([1], DecodeParams(max_new_tokens=10_000)), "max_position_embeddings"),
    ],
)
def test_bad_input_raises_precise_value_error(engine, make, message):
    with pytest.raises(ValueError, match=message):
        make(engine)
