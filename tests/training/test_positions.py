"""Prompt positions (training.positions), the all-position evaluation (training.evaluate_positions)
and the phase-4 mix of distill_tiny / train_lora (prompts from all positions, per-row prompt
lengths), on hand-written sources and the 2-layer checkpoint of test_training."""

from __future__ import annotations

import json
import math
import shutil

import torch

from replicas.engine.loader import load_model
from training import distill_tiny, evaluate_positions as ep, positions, train_lora, train_tiny as tt
from tests.training.test_training import tiny_run  # noqa: F401  (module fixture: a 2-layer checkpoint)

CODE = '''"""Module docstring."""
import os

# a comment


class Box:
    """A box."""

    def __init__(self, size):
        self.size = size
        self.items = []
        self.open = False

    @property
    def full(self):
        return len(self.items) >= self.size


def load(path):
    try:
        with open(path) as f:
            data = f.read()
        return data
    except OSError:
        return None
'''


def line_end(text: str, line: str) -> int:
    """Offset just after the (unique) line that contains `line`."""
    i = text.index(line)
    return text.index("\n", i) + 1


def test_cut_points_find_each_kind_at_the_right_line():
    cuts = positions.cut_points(CODE)
    assert cuts["file_start"] == [0]
    assert cuts["after_def"] == [line_end(CODE, "def __init__"), line_end(CODE, "def full"), line_end(CODE, "def load")]
    assert cuts["after_except"] == [line_end(CODE, "except OSError")]
    assert cuts["after_comment"] == [line_end(CODE, "# a comment")]
    # the blank lines before `def __init__` and before `@property`, both inside class Box
    assert cuts["inside_class"] == [line_end(CODE, '"""A box."""') + 1, line_end(CODE, "self.open = False") + 1]
    # body lines followed by another body line of the same function
    mid = cuts["mid_body"]
    assert line_end(CODE, "self.size = size") in mid and line_end(CODE, "self.items = []") in mid
    assert line_end(CODE, "self.open = False") not in mid  # the body's last line
    assert line_end(CODE, "data = f.read()") in mid
    assert line_end(CODE, "return None") not in mid


def test_prompt_at_ends_on_the_files_own_token_boundary(tiny_run):  # noqa: F811
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_run[1] / "tokenizer.json"))
    enc = tok.encode(CODE)
    cut = line_end(CODE, "def load")
    start, end = positions.prompt_at(enc.ids, enc.offsets, "after_def", cut, 6)
    assert end - start == 6 and enc.offsets[end][0] >= cut and enc.offsets[end - 1][0] < cut
    assert positions.prompt_at(enc.ids, enc.offsets, "file_start", 0, 5) == (0, 5)
    assert positions.prompt_at(enc.ids, enc.offsets, "after_def", 3, 50)[0] == 0  # short of tokens: from 0


def test_loop_marks_counts_tokens_of_repeated_ngrams():
    assert ep.loop_marks(list(range(20)), 4) == 0
    assert ep.loop_marks([5] * 10, 4) == 9  # every 4-gram after the first repeats: all tokens but the first
    # period-3 loop after 4 distinct tokens: 4-grams repeat from the second period on
    seq = [90, 91, 92, 93] + [1, 2, 3] * 4
    assert ep.loop_marks(seq, 4) == 9  # the first 4-gram of the loop starts at index 4; repeats cover 7..15
    assert ep.loop_marks([1, 2, 1, 2], 8) == 0  # shorter than n


def test_sample_position_prompts_is_deterministic_and_cut_at_kinds(tiny_run):  # noqa: F811
    from tokenizers import Tokenizer

    _, out, _ = tiny_run
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    texts = [CODE, CODE.replace("Box", "Crate")]
    enc = positions.encode_with_offsets(tok, texts)
    a = positions.sample_position_prompts(enc, texts, 40, [4, 8], torch.Generator().manual_seed(3))
    b = positions.sample_position_prompts(enc, texts, 40, [4, 8], torch.Generator().manual_seed(3))
    assert a == b and len(a) == 40
    assert all(4 <= len(p) <= 8 for p in a)
    ids = [e[0] for e in enc]
    # every prompt is a contiguous slice of one file's tokens
    assert all(any(p == i[s : s + len(p)] for i in ids for s in range(len(i))) for p in a)
    assert any(p == ids[0][: len(p)] for p in a)  # file starts occur


def test_phase4_distillation_uses_all_positions_and_lora_follows(tiny_run, tmp_path):  # noqa: F811
    lib, out, _ = tiny_run
    ckpt = tmp_path / "ckpt"
    shutil.copytree(out, ckpt)
    before = load_model(ckpt).state_dict()
    log = distill_tiny.main(["--model", str(ckpt), "--lib", str(lib), "--steps", "2", "--rounds", "1",
                             "--samples", "3", "--prompt-mix", "positions", "--lengths", "4,8", "--total", "16",
                             "--batch", "2", "--distill-batch", "2", "--seq", "32", "--eval-windows", "2",
                             "--threads", "1"])
    assert log["phase4"]["rounds"][0] == {**log["phase4"]["rounds"][0], "samples": 3, "length": 16}
    assert log["train"][-1]["phase"] == 4 and math.isfinite(log["train"][-1]["diff_self"])
    after = load_model(ckpt).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    lora_log = train_lora.main(["--model", str(ckpt), "--lib", str(lib), "--steps", "1", "--samples", "2",
                                "--prompt-mix", "positions", "--lengths", "4,8", "--total", "16", "--batch", "2",
                                "--rank", "4", "--alpha", "8", "--threads", "1"])
    assert math.isfinite(lora_log["train"][-1]["draft_ce"])


def test_per_row_loss_from_masks_only_the_generated_part():
    clean = torch.randint(200, 300, (2, 16))
    batch = tt.noise_rows(clean, [4], torch.Generator().manual_seed(0), keep_first_prob=0.0, suffix_prob=0.0,
                          loss_from=[3, 9])
    assert not batch["masked"][0, :3].any() and not batch["masked"][1, :9].any()
    assert torch.equal(batch["noisy"][1, :9], clean[1, :9])
    assert batch["masked"][1, 9:].any()
    rows = train_lora.full_draft_rows(clean, [4], torch.Generator().manual_seed(0), [3, 9])
    assert not rows["masked"][1, :9].any() and rows["masked"][1, 9:].any()
    assert rows["loss_tokens"] == int(rows["masked"].sum())


def test_evaluation_on_a_small_lib(tiny_run, tmp_path):  # noqa: F811
    lib = tmp_path / "lib"
    shutil.copytree(tiny_run[0], lib)
    out = tiny_run[1]
    held = json.loads((out / "split.json").read_text())["heldout"]
    for rel in held:  # give the held-out files every kind of cut point, with 16 tokens after each middle one
        (lib / rel).write_text(CODE * 3)
    res = ep.evaluate(out, lengths=(4, 8), new_tokens=12, block=4, lib=lib, heldout_loss=False)
    assert res["prompts"] == 6 * len(held)  # one prompt per kind per held-out file
    ar, ss = res["all"]["ar"], res["all"]["self_spec B4"]
    assert ar["tokens"] == ss["tokens"] == 12 * res["prompts"]
    assert ss["same_as_ar"] == res["prompts"]  # greedy self-spec reproduces AR
    assert 0.0 <= ar["loop_share"] <= 1.0 and ar["loop_share"] == ss["loop_share"]
    assert set(res["by_kind"]) == set(positions.KINDS)
    assert sum(g["ar"]["prompts"] for g in res["by_length"].values()) == res["prompts"]
    assert 0.0 <= ar["exact@16"] <= ar["exact@4"] <= ar["exact@1"] <= 1.0
    assert ss["mean_prefix"] == ar["mean_prefix"]  # the same output, the same match
    diff = next(g for name, g in res["all"].items() if name.startswith("diffusion"))
    assert 0.0 <= diff["exact@16"] <= diff["exact@4"] <= diff["exact@1"] <= 1.0
    prompts = ep.heldout_prompt_set(out, (4, 8), lib)
    assert prompts == ep.heldout_prompt_set(out, (4, 8), lib)  # deterministic
    assert all(p["file"] in held for p in prompts)
    table = ep.format_table(res)
    assert "after_except" in table and "exact@16" in table and "diffusion B4 tau0.9 vs the file's real" in table
