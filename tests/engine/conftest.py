"""Shared fixtures: tiny random NLD checkpoints written once per test session."""

from __future__ import annotations

import pytest

from replicas.engine import Engine
from replicas.engine.testing import write_random_checkpoint


@pytest.fixture(scope="session")
def ckpt_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("nld") / "tiny", seed=0)


@pytest.fixture(scope="session")
def lora_ckpt_dir(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("nld") / "tiny-lora", seed=1, lora_rank=8)


@pytest.fixture(scope="session")
def engine(ckpt_dir):
    return Engine.from_pretrained(ckpt_dir)


@pytest.fixture(scope="session")
def lora_engine(lora_ckpt_dir):
    return Engine.from_pretrained(lora_ckpt_dir)
