"""config.json parsing and checkpoint loading: precise errors, sharded files, LoRA adapters, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from replicas.engine import CheckpointError, ConfigError, DecodeParams, Engine, ModelConfig
from replicas.engine.testing import random_config, write_random_checkpoint


def test_config_parses_the_8b_layout():
    raw = random_config(layers=34, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336,
                        vocab=131072, block_size=32, max_position_embeddings=262144, rope_factor=16.0)
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.factor == 16.0
    assert cfg.rope.original_max_position_embeddings == 16384
    assert cfg.rope.resolved_attention_factor() == 1.0  # mscale == mscale_all_dim
    assert cfg.eos_token_ids == (11,) and cfg.mask_token_id == 100 and cfg.block_size == 32


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "mask_token_id",
                                 "eos_token_id", "num_key_value_heads", "max_position_embeddings"])
def test_missing_required_key_is_named(key):
    raw = random_config()
    del raw[key]
    with pytest.raises(ConfigError, match=repr(key)):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r["rope_parameters"].update(rope_type="longrope"), "rope_parameters.rope_type"),
        (lambda r: r.update(hidden_act="gelu"), "hidden_act"),
        (lambda r: r.update(dlm_paradigm="autoregressive"), "dlm_paradigm"),
        (lambda r: r.update(num_key_value_heads=3), "num_key_value_heads"),
        (lambda r: r.update(mask_token_id=10_000), "mask_token_id"),
        (lambda r: r.update(block_size=1), "block_size"),
        (lambda r: r.update(hidden_size=-4), "hidden_size"),
        (lambda r: r["rope_parameters"].pop("original_max_position_embeddings"), "original_max_position_embeddings"),
        (lambda r: r.pop("rope_parameters"), "rope_theta"),
    ],
)
def test_unsupported_values_are_named(change, message):
    raw = random_config()
    change(raw)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(raw)


def test_default_rope_type_is_supported(tmp_path):
    d = write_random_checkpoint(tmp_path / "m")
    raw = json.loads((d / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(raw))
    out = Engine.from_pretrained(d).generate([1, 2, 3], DecodeParams(max_new_tokens=4))
    assert len(out.token_ids) == 4


def test_sharded_checkpoint_loads_identically(tmp_path):
    single = Engine.from_pretrained(write_random_checkpoint(tmp_path / "one", seed=9))
    sharded = Engine.from_pretrained(write_random_checkpoint(tmp_path / "three", seed=9, shards=3))
    assert (tmp_path / "three" / "model.safetensors.index.json").is_file()
    for (name, a), (_, b) in zip(single.model.state_dict().items(), sharded.model.state_dict().items()):
        assert torch.equal(a, b), name


def test_bfloat16_load(tmp_path):
    engine = Engine.from_pretrained(write_random_checkpoint(tmp_path / "m", dtype="bfloat16"), dtype="bfloat16")
    assert engine.model.diffusion_head.weight.dtype == torch.bfloat16
    assert len(engine.generate([1, 2], DecodeParams(mode="self_spec", max_new_tokens=6)).token_ids) == 6


def rewrite_weights(d, edit):
    state = load_file(str(d / "model.safetensors"))
    edit(state)
    save_file(state, str(d / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("encoder.layers.1.mlp.up_proj.weight"), "missing tensor 'encoder.layers.1.mlp.up_proj.weight'"),
        (lambda s: s.update({"encoder.layers.9.extra.weight": torch.zeros(2)}), "unexpected tensor 'encoder.layers.9.extra.weight'"),
        (lambda s: s.update({"encoder.norm.weight": torch.ones(65)}), r"'encoder.norm.weight' has shape \(65,\), expected \(64,\)"),
    ],
)
def test_bad_tensors_are_named_with_shapes(tmp_path, edit, message):
    d = write_random_checkpoint(tmp_path / "m")
    rewrite_weights(d, edit)
    with pytest.raises(CheckpointError, match=message):
        Engine.from_pretrained(d)


def test_lora_loaded_from_subfolder_or_explicit_path(tmp_path):
    d = write_random_checkpoint(tmp_path / "m", lora_rank=4)
    assert Engine.from_pretrained(d).has_lora
    assert not Engine.from_pretrained(d, lora=False).has_lora
    plain = write_random_checkpoint(tmp_path / "plain")
    assert Engine.from_pretrained(plain, lora=d / "linear_spec_lora").has_lora
    conf = json.loads((d / "linear_spec_lora" / "adapter_config.json").read_text())
    conf["target_modules"] = ["q_proj"]
    (d / "linear_spec_lora" / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="target_modules"):
        Engine.from_pretrained(d)


def test_cli_prints_one_json_object(ckpt_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "replicas.engine", "--model", str(ckpt_dir), "--mode", "self_spec",
         "--prompt-ids", "1,2,3", "--max-new-tokens", "12"], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["token_ids"]) == 12
    assert out["forward_passes"] > 0
    assert out["tokens_per_forward"] == pytest.approx(12 / out["forward_passes"], abs=1e-3)
    assert {"seconds", "finish_reason", "accepted_lengths"} <= set(out)
    bad = subprocess.run([sys.executable, "-m", "replicas.engine", "--model", str(ckpt_dir), "--prompt-ids", "1,99999"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "outside the vocabulary" in bad.stderr

