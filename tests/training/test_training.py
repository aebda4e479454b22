"""The tiny-model training script: masking and attention layout against brute force, the corpus
split, two real training steps (plus one self-distillation step and one LoRA step) on a 2-layer
model, and the checkpoint they write loading in the engine."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np

import pytest
import torch

from replicas.engine import DecodeParams, Engine
from replicas.engine.loader import load_lora, load_model
from training import certainty, distill_tiny, train_lora, train_tiny as tt


def brute_blocks(t: int, block: int, offset: int) -> list[int]:
    """Block index per position: a new block starts at every position p with p % block == offset % block."""
    out, k = [], 0
    for p in range(t):
        if p > 0 and p % block == offset % block:
            k += 1
        out.append(k)
    return out


def brute_mask(t: int, block: int, offset: int) -> torch.Tensor:
    """[noisy | clean] rules written out pair by pair."""
    blk = brute_blocks(t, block, offset)
    m = torch.zeros(2 * t, 2 * t, dtype=torch.bool)
    for q in range(2 * t):
        for k in range(2 * t):
            q_noisy, k_noisy = q < t, k < t
            i, j = q % t, k % t
            if not q_noisy and not k_noisy:
                m[q, k] = j <= i  # clean -> clean: causal
            elif q_noisy and k_noisy:
                m[q, k] = blk[i] == blk[j]  # noisy -> noisy: bidirectional inside the block
            elif q_noisy and not k_noisy:
                m[q, k] = blk[j] < blk[i]  # noisy -> clean: earlier blocks only
            else:
                m[q, k] = False  # clean -> noisy: never
    return m


@pytest.mark.parametrize("t,block,offset", [(8, 4, 0), (8, 4, 1), (10, 3, 2), (16, 16, 5), (7, 8, 3), (12, 2, 1)])
def test_block_ids_and_attention_layout_match_brute_force(t, block, offset):
    assert tt.block_ids(t, block, offset).tolist() == brute_blocks(t, block, offset)
    assert torch.equal(tt.joint_attention_mask(t, block, offset), brute_mask(t, block, offset))


def test_layout_properties():
    m = tt.joint_attention_mask(32, 8, 3)
    assert m.diagonal().all()  # every query sees itself: no empty softmax rows
    assert not m[32:, :32].any()  # the clean stream never sees the noisy copy


@pytest.mark.parametrize("keep_first,suffix", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5)])
def test_noise_blocks_ratio_weight_and_placement(keep_first, suffix):
    gen = torch.Generator().manual_seed(0)
    t, block = 64, 8
    for trial in range(20):
        offset = trial % block
        tokens = torch.randint(200, 300, (t,), generator=gen)
        noisy, masked, weight = tt.noise_blocks(tokens, block, offset, gen, keep_first_prob=keep_first,
                                                suffix_prob=suffix)
        assert torch.equal(noisy, torch.where(masked, torch.full_like(tokens, tt.MASK_ID), tokens))
        assert torch.all(weight[~masked] == 0)
        blk = torch.tensor(brute_blocks(t, block, offset))
        for k in blk.unique().tolist():
            idx = (blk == k).nonzero().squeeze(1)
            m = masked[idx]
            assert m.sum() >= 1  # t > 0: at least one masked token per block
            if keep_first == 1.0 and len(idx) >= 2:
                assert not m[0]
            maskable = len(idx) - (1 if keep_first == 1.0 and len(idx) >= 2 else 0)
            if keep_first in (0.0, 1.0):  # weight = 1/t with t = masked / maskable
                assert torch.allclose(weight[idx][m], torch.full((int(m.sum()),), maskable / float(m.sum())))
            if suffix == 1.0:  # the masked tokens are the block's last ones
                first = int(m.nonzero()[0])
                assert m[first:].all()


def test_t_is_uniform_over_blocks():
    """m ~ U{1..n}: the mean masked fraction of a long stream is about (n + 1) / (2n)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.full((4096,), 300)
    _, masked, _ = tt.noise_blocks(tokens, 16, 0, gen, keep_first_prob=0.0, suffix_prob=0.0)
    assert abs(masked.float().mean().item() - 17 / 32) < 0.05


def test_split_is_deterministic_and_disjoint():
    paths = [f"pkg/mod{i}.py" for i in range(100)]
    a, b = tt.split_files(paths, 0), tt.split_files(list(reversed(paths)), 0)
    assert a == b
    assert not set(a["train"]) & set(a["heldout"])
    assert sorted(a["train"] + a["heldout"]) == sorted(paths)
    assert len(a["heldout"]) == 5
    assert tt.split_files(paths, 1)["heldout"] != a["heldout"]


def test_collect_files_skips_tests_and_packages(tmp_path):
    for rel in ["a.py", "pkg/b.py", "test/c.py", "pkg/tests/d.py", "site-packages/e.py", "f.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    assert tt.collect_files(tmp_path) == ["a.py", "pkg/b.py"]


SOURCE = '''
def add(a, b):
    """Return the sum of a and b."""
    return a + b


class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count
'''


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    lib = tmp_path_factory.mktemp("lib")
    for i in range(24):
        (lib / f"mod{i}.py").write_text(SOURCE.replace("add", f"add{i}").replace("Counter", f"Counter{i}") * 3)
    out = tmp_path_factory.mktemp("ckpt")
    log = tt.main([
        "--out", str(out), "--lib", str(lib), "--steps", "2", "--distill-steps", "1", "--distill-samples", "2",
        "--distill-prompt", "8", "--distill-new", "8", "--distill-batch", "2", "--layers", "2", "--hidden", "64",
        "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--intermediate", "128", "--vocab", "512",
        "--seq", "32", "--batch", "2", "--warmup", "1", "--eval-windows", "2", "--log-every", "1", "--threads", "1",
    ])
    return lib, out, log


def test_two_training_steps_have_finite_loss_and_write_a_loadable_checkpoint(tiny_run):
    lib, out, log = tiny_run
    assert len(log["train"]) == 3
    for rec in log["train"]:
        assert math.isfinite(rec["ar"]) and math.isfinite(rec["diff"])
    assert "diff_self" in log["train"][-1] and math.isfinite(log["train"][-1]["diff_self"])
    assert math.isfinite(log["heldout_ar_final"])
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "split.json",
                 "train_log.json", "loss_curves.png"]:
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16" and cfg["mask_token_id"] == 100
    assert cfg["bos_token_id"] == 1 and cfg["eos_token_id"] == 11
    split = json.loads((out / "split.json").read_text())
    assert split["heldout"] and split["train"] and split["python_version"]

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.token_to_id("<s>") == 1 and tok.token_to_id("</s>") == 11 and tok.token_to_id("<mask>") == 100
    text = "def add(a, b):\n    return a + b\n"
    assert tok.decode(tok.encode(text).ids) == text

    engine = Engine.from_pretrained(out)
    prompt = [1] + tok.encode(SOURCE[:60]).ids
    outs = {m: engine.generate(prompt, DecodeParams(mode=m, max_new_tokens=12, block_length=4, ignore_eos=True))
            for m in ("ar", "self_spec", "diffusion")}
    assert outs["self_spec"].token_ids == outs["ar"].token_ids
    assert all(len(o.token_ids) == 12 for o in outs.values())


def test_one_lora_step_writes_a_peft_adapter_the_engine_loads(tiny_run):
    lib, out, _ = tiny_run
    log = train_lora.main(["--model", str(out), "--lib", str(lib), "--steps", "1", "--samples", "2", "--prompt", "8",
                           "--new", "8", "--batch", "2", "--rank", "4", "--alpha", "8", "--threads", "1"])
    assert math.isfinite(log["train"][-1]["draft_ce"])
    model = load_model(out)
    deltas = load_lora(out / "linear_spec_lora", model.config, "cpu", torch.float32)
    assert len(deltas) == model.config.num_hidden_layers and deltas[0][0].shape[0] == 4
    engine = Engine.from_pretrained(out)
    assert engine.has_lora
    prompt = [1, 200, 201, 202, 203]
    ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=10, ignore_eos=True))
    ss = engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=10, block_length=4, ignore_eos=True))
    assert ss.token_ids == ar.token_ids


def test_sample_prompts_mixes_file_starts_and_windows():
    stream = np.arange(1000, dtype=np.int32)
    starts = [[7, 8, 9, 10], [20, 21, 22, 23]]
    gen = torch.Generator().manual_seed(0)
    prompts = tt.sample_prompts(stream, 200, 4, gen, file_starts=starts, file_start_frac=0.75)
    from_starts = sum(p in starts for p in prompts)
    assert 120 <= from_starts <= 180  # about 75%
    assert all(p in starts or p == list(range(p[0], p[0] + 4)) for p in prompts)
    assert tt.sample_prompts(stream, 5, 4, torch.Generator().manual_seed(1)) == \
        tt.sample_prompts(stream, 5, 4, torch.Generator().manual_seed(1), file_starts=starts)  # frac 0: windows


def test_file_start_prompts_are_the_first_tokens_of_each_long_enough_file(tiny_run):
    from tokenizers import Tokenizer

    _, out, _ = tiny_run
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    got = tt.file_start_prompts(tok, [SOURCE, "x = 1\n"], 8)
    assert got == [tok.encode(SOURCE).ids[:8]]  # the short file is skipped; no bos is added


def assert_changed_and_self_spec_equals_ar(ckpt, before: dict) -> None:
    """The checkpoint's weights moved from `before`, and it still decodes: greedy self_spec == ar."""
    after = load_model(ckpt).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    engine = Engine.from_pretrained(ckpt)
    prompt = [1, 200, 201, 202, 203]
    ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=10, ignore_eos=True))
    ss = engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=10, block_length=4, ignore_eos=True))
    assert ss.token_ids == ar.token_ids


def test_phase3_distillation_continues_the_checkpoint_and_its_log(tiny_run, tmp_path):
    lib, out, _ = tiny_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt)
    before = load_model(ckpt).state_dict()
    log = distill_tiny.main(["--model", str(ckpt), "--lib", str(lib), "--steps", "2", "--rounds", "1",
                             "--samples", "2", "--prompt", "8", "--new", "8", "--batch", "2", "--distill-batch", "2",
                             "--seq", "32", "--eval-windows", "2", "--threads", "1"])
    assert log["phase3"]["from_step"] == 3 and log["train"][-1]["step"] == 5 and log["train"][-1]["phase"] == 3
    assert math.isfinite(log["train"][-1]["diff_self"]) and math.isfinite(log["heldout_ar_final"])
    assert json.loads((ckpt / "train_log.json").read_text())["phase3"]["rounds"][0]["samples"] == 2
    assert_changed_and_self_spec_equals_ar(ckpt, before)


def test_the_self_distillation_term_takes_its_own_weight():
    """distill_tiny --self-alpha: the self-generated term's weight, apart from the corpus's --alpha."""
    import argparse

    cfg = tt.ModelConfig.from_dict(tt.random_config(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8,
                                                    intermediate=64, vocab=400))
    model = tt.init_model(cfg, 0)
    distill = torch.randint(200, 300, (4, 16), generator=torch.Generator().manual_seed(1))
    args = argparse.Namespace(alpha=0.3, keep_first=0.75, suffix_prob=0.5)

    def term(alpha):
        return tt.self_distill_loss(model, distill, 2, 4, [4], torch.Generator().manual_seed(0), args, "cpu",
                                    alpha=alpha)

    (default, l0), (same, l1), (double, l2) = term(None), term(0.3), term(0.6)
    assert l0 == l1 == l2 and l0 > 0  # the same rows and noise: the same L_diff
    default, same, double = (float(x.detach()) for x in (default, same, double))
    assert default == pytest.approx(same) and double == pytest.approx(2 * same)


def test_lora_hook_touches_only_the_noisy_half():
    cfg = tt.ModelConfig.from_dict(tt.random_config(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8,
                                                    intermediate=64, vocab=400))
    model = tt.init_model(cfg, 0).eval().requires_grad_(False)
    t = 12
    batch = train_lora.full_draft_rows(torch.randint(200, 300, (2, t)), [4], torch.Generator().manual_seed(0), 0)
    tokens = torch.cat([batch["noisy"], batch["clean"]], 1)
    pos = torch.arange(t).repeat(2)[None].expand(2, -1)
    attn = tt.AttentionInputs(write_index=pos, mask=batch["mask"])
    base = model(tokens, pos, None, attn)
    lora = train_lora.OProjLoRA(model, 4, 8.0, 0)
    for b in lora.b:
        b.data.normal_()
    lora.rows = t
    with_lora = model(tokens, pos, None, attn)
    assert torch.allclose(base[:, t:], with_lora[:, t:])  # clean half: LoRA off
    assert not torch.allclose(base[:, :t], with_lora[:, :t])


def test_draft_rows_weigh_each_mask_by_its_distance_from_the_seed():
    """--position-decay: a mask d positions after its draft's seed weighs decay ** (d - 1) (a row's
    first, cut block counts from the row's first token); decay 1.0 keeps the unweighted loss."""
    seqs = torch.randint(200, 300, (3, 13))
    for decay in (1.0, 0.5):
        batch = train_lora.full_draft_rows(seqs, [4], torch.Generator().manual_seed(1), 0, decay=decay)
        for m, w in zip(batch["masked"], batch["weight"]):
            seeds = [i for i in range(13) if not m[i]]
            assert seeds[0] == 0 and all(b - a <= 4 for a, b in zip(seeds, seeds[1:] + [13]))
            for i in range(13):
                d = i - max(s for s in seeds if s <= i)
                assert float(w[i]) == (decay ** (d - 1) if m[i] else 0.0)


def test_amp_runs_every_training_script_under_bfloat16_autocast_on_cpu(tiny_run, tmp_path, monkeypatch):
    """--amp: the losses are computed under CPU bfloat16 autocast (seen inside joint_loss), stay finite,
    and the checkpoint and adapter still load and decode (self_spec == ar)."""
    lib, out, _ = tiny_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt)
    seen = []
    real = tt.joint_loss

    def spy(*a, **k):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return real(*a, **k)

    monkeypatch.setattr(tt, "joint_loss", spy)
    log = tt.main(["--out", str(tmp_path / "fresh"), "--lib", str(lib), "--steps", "2", "--distill-steps", "0",
                   "--layers", "2", "--hidden", "64", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
                   "--intermediate", "128", "--vocab", "512", "--seq", "32", "--batch", "2", "--warmup", "1",
                   "--eval-windows", "2", "--log-every", "1", "--threads", "1", "--amp"])
    assert all(math.isfinite(r["ar"]) and math.isfinite(r["diff"]) for r in log["train"])
    log = distill_tiny.main(["--model", str(ckpt), "--lib", str(lib), "--steps", "1", "--rounds", "1",
                             "--samples", "2", "--prompt", "8", "--new", "8", "--batch", "2", "--distill-batch", "2",
                             "--seq", "32", "--eval-windows", "2", "--threads", "1", "--amp"])
    assert math.isfinite(log["train"][-1]["diff_self"])
    log = train_lora.main(["--model", str(ckpt), "--lib", str(lib), "--steps", "1", "--samples", "2", "--prompt", "8",
                           "--new", "8", "--batch", "2", "--rank", "4", "--alpha", "8", "--threads", "1", "--amp"])
    assert math.isfinite(log["train"][-1]["draft_ce"])
    assert len(seen) >= 4 and all(seen)
    engine = Engine.from_pretrained(ckpt)
    prompt = [1, 200, 201, 202, 203]
    ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=10, ignore_eos=True))
    ss = engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=10, block_length=4, ignore_eos=True))
    assert ss.token_ids == ar.token_ids


def test_certainty_entropy_counts_only_right_predictions_and_sharpens_them():
    """certainty_entropy: the mean entropy of the rows whose argmax is the target; a gradient step on
    it raises those rows' top probability and leaves the wrong rows alone."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [3.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 1, 2])  # rows 0 and 1 right, row 2 wrong
    h = certainty.certainty_entropy(logits, targets)
    p = torch.softmax(logits.detach()[:2], dim=-1)
    assert float(h.detach()) == pytest.approx(float(-(p * p.log()).sum(-1).mean()))
    h.backward()
    assert torch.equal(logits.grad[2], torch.zeros(3))
    stepped = logits.detach() - 1.0 * logits.grad
    assert all(torch.softmax(stepped[i], -1)[t] > torch.softmax(logits.detach()[i], -1)[t] for i, t in ((0, 0), (1, 1)))
    none_right = certainty.certainty_entropy(logits, torch.tensor([1, 2, 1]))
    assert float(none_right.detach()) == 0.0 and none_right.requires_grad


def test_generate_to_length_writes_the_models_own_diffusion_trajectory(tiny_run):
    _, out, _ = tiny_run
    model = load_model(out)
    prompts = [[1, 200, 201, 202], [1, 300, 301, 302, 303, 304]]
    seqs, plen = tt.generate_to_length(model, prompts, 16, mode="diffusion", block=4, threshold=0.5)
    assert seqs.shape == (2, 16) and plen.tolist() == [4, 6]
    engine = Engine(model, max_block_length=64)
    for row, prompt in zip(seqs.tolist(), prompts):
        want = engine.generate(prompt, DecodeParams(mode="diffusion", block_length=4, threshold=0.5,
                                                    max_new_tokens=16 - len(prompt), ignore_eos=True)).token_ids
        assert row == prompt + want[: 16 - len(prompt)]


def test_phase5_distils_on_diffusion_trajectories_with_the_certainty_term(tiny_run, tmp_path):
    """distill_tiny --self-mode diffusion --certainty: phase 5 in the log, the certainty term logged
    finite, the checkpoint changed and self_spec still equal to ar."""
    lib, out, _ = tiny_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt)
    before = load_model(ckpt).state_dict()
    log = distill_tiny.main(["--model", str(ckpt), "--lib", str(lib), "--steps", "2", "--rounds", "1",
                             "--samples", "2", "--prompt-mix", "positions", "--lengths", "8", "--total", "16",
                             "--self-mode", "diffusion", "--self-block", "4", "--certainty", "1.0", "--anchor", "1.0", "--batch", "2",
                             "--distill-batch", "2", "--seq", "32", "--eval-windows", "2", "--threads", "1"])
    assert log["phase5"]["rounds"][0]["samples"] == 2 and log["train"][-1]["phase"] == 5
    last = log["train"][-1]
    assert math.isfinite(last["certainty_entropy"]) and last["certainty_entropy"] >= 0
    assert math.isfinite(last["anchor_kl"]) and last["anchor_kl"] >= 0
    assert_changed_and_self_spec_equals_ar(ckpt, before)


def test_anchor_kl_is_zero_at_the_teacher_and_pulls_toward_it():
    teacher = torch.tensor([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # [1, 2, V]
    assert float(certainty.anchor_kl(teacher.clone(), teacher)) == pytest.approx(0.0, abs=1e-7)
    student = torch.tensor([[[0.0, 2.0, -1.0], [0.0, 0.0, 3.0]]], requires_grad=True)
    kl = certainty.anchor_kl(student, teacher)
    p, q = torch.softmax(teacher, -1), torch.softmax(student.detach(), -1)
    assert float(kl.detach()) == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-5)
    kl.backward()
    stepped = student.detach() - 0.5 * student.grad
    assert float(certainty.anchor_kl(stepped, teacher)) < float(kl.detach())


def test_the_anchor_joins_the_corpus_loss_only_with_a_teacher(tiny_run):
    """joint_loss(anchor=...): KL to the teacher added to the corpus loss; 0 against itself."""
    _, out, _ = tiny_run
    model, teacher = load_model(out), load_model(out).requires_grad_(False)
    batch = tt.make_batch(np.arange(200, 300).repeat(3), 2, 16, [4], torch.Generator().manual_seed(0),
                          keep_first_prob=0.75, suffix_prob=0.5)
    stats: dict = {}
    plain, *_ = tt.joint_loss(model, batch, 0.3, "cpu")
    same, *_ = tt.joint_loss(model, batch, 0.3, "cpu", teacher=teacher, anchor=5.0, stats=stats)
    assert stats["anchor"] == pytest.approx(0.0, abs=1e-6) and float(same) == pytest.approx(float(plain), rel=1e-5)
    with torch.no_grad():
        for prm in teacher.parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    moved, *_ = tt.joint_loss(model, batch, 0.3, "cpu", teacher=teacher, anchor=5.0, stats=stats)
    assert stats["anchor"] > 0 and float(moved) == pytest.approx(float(plain) + 5.0 * stats["anchor"], rel=1e-4)


def test_the_denoise_adapter_trains_on_diffusion_trajectories_and_leaves_ar_alone(tiny_run, tmp_path):
    """train_lora --objective denoise: diffusion_lora/ (its own log), loaded by the engine for
    diffusion denoise passes only: AR and self-spec output are the backbone's."""
    lib, out, _ = tiny_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt)
    draft_log = (ckpt / "lora_train_log.json").read_text() if (ckpt / "lora_train_log.json").exists() else None
    log = train_lora.main(["--model", str(ckpt), "--lib", str(lib), "--objective", "denoise", "--certainty", "1.0",
                           "--prompt-mix", "positions", "--lengths", "8", "--total", "16", "--steps", "2",
                           "--samples", "2", "--batch", "2", "--rank", "4", "--alpha", "8", "--blocks", "4",
                           "--self-block", "4", "--threads", "1"])
    assert math.isfinite(log["train"][-1]["draft_ce"]) and math.isfinite(log["train"][-1]["certainty_entropy"])
    assert (ckpt / "diffusion_lora" / "adapter_model.safetensors").is_file()
    assert json.loads((ckpt / "diffusion_lora_train_log.json").read_text())["args"]["objective"] == "denoise"
    if draft_log is not None:
        assert (ckpt / "lora_train_log.json").read_text() == draft_log
    engine = Engine.from_pretrained(ckpt)
    plain = Engine.from_pretrained(ckpt, denoise_lora=False)
    assert engine.has_denoise_lora and not plain.has_denoise_lora
    prompt = [1, 200, 201, 202, 203]
    ar = engine.generate(prompt, DecodeParams(mode="ar", max_new_tokens=10, ignore_eos=True))
    assert ar.token_ids == plain.generate(prompt, DecodeParams(mode="ar", max_new_tokens=10, ignore_eos=True)).token_ids
    ss = engine.generate(prompt, DecodeParams(mode="self_spec", max_new_tokens=10, block_length=4, ignore_eos=True))
    assert ss.token_ids == ar.token_ids
    diff = engine.generate(prompt, DecodeParams(mode="diffusion", max_new_tokens=10, block_length=4, ignore_eos=True))
    assert len(diff.token_ids) == 10
    with pytest.raises(SystemExit, match="positions"):
        train_lora.main(["--model", str(ckpt), "--lib", str(lib), "--objective", "denoise", "--steps", "1"])
