"""The replica's text edge: chat messages whose content is null or absent render as empty text
(OpenAI allows them for tool and assistant turns; templates read `message['content']`)."""

from __future__ import annotations

import pytest

from replicas.engine.testing import write_random_checkpoint
from replicas.text import ChatTemplateError, TextCodec


@pytest.fixture(scope="module")
def codec(tmp_path_factory):
    return TextCodec.from_dir(write_random_checkpoint(tmp_path_factory.mktemp("text") / "m", seed=3))


@pytest.mark.parametrize("messages", [
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "tool"}],
])
def test_null_or_absent_content_renders_as_empty(codec, messages):
    text = codec.render_chat(messages)
    expected = "<s>" + "".join(f"<|{m['role']}|>\n{m.get('content') or ''}\n" for m in messages) + "<|assistant|>\n"
    assert text == expected
    assert codec.encode_chat(messages)


def test_a_template_error_is_still_reported(codec):
    broken = TextCodec(codec.tokenizer, "{{ raise_exception('no system turns') }}")
    with pytest.raises(ChatTemplateError, match="no system turns"):
        broken.render_chat([{"role": "user", "content": "x"}])
