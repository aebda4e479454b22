"""Suite-wide settings: one torch thread (the test models are tiny, and a second thread only
adds contention on a 2-core CI machine)."""

import torch

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def serve_model_dir(tmp_path_factory):
    from replicas.engine.testing import write_random_checkpoint

    return write_random_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", seed=11, lora_rank=4, denoise_lora_rank=4)


@pytest.fixture(scope="session")
def serve_stack(serve_model_dir):
    """Real Ray Serve replicas on loopback, shared by every integration test of the session."""
    from tests.serving import ServeStack

    stack = ServeStack.start(serve_model_dir)
    yield stack
    stack.stop()
