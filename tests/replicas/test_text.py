"""The replica's text edge: incremental detokenisation equals decoding everything at once,
whatever the chunking, with multi-byte characters split across tokens and stop strings; chat
messages whose content is null or absent render as empty text (OpenAI allows them for tool and
assistant turns; templates read `message['content']`)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from replicas.engine.testing import write_random_checkpoint
from replicas.text import ChatTemplateError, Detokenizer, TextCodec

MODEL = Path(__file__).resolve().parents[2] / "models" / "nld-tiny-pystdlib"


@pytest.fixture(scope="module")
def codec() -> TextCodec:
    return TextCodec.from_dir(MODEL)


def chunks_of(ids: list[int], rng: random.Random) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(1, 5)
        out.append(ids[i:i + n])
        i += n
    return out


TEXTS = ["def main():\n    print('héllo wörld ✓ 😀')\n    return 0\n",
         "import os\n\n\nclass Foo:\n    \"\"\"Ünïcödé docstring — ok\"\"\"\n",
         "x = {'a': [1, 2, 3]}  # ∑ ≠ ∞\n" * 3]


@pytest.mark.parametrize("seed", range(6))
def test_deltas_add_up_to_the_full_decode(codec, seed):
    rng = random.Random(seed)
    ids = codec.encode(TEXTS[seed % len(TEXTS)])
    ids += [rng.randrange(codec.tokenizer.get_vocab_size()) for _ in range(40)]  # arbitrary ids too
    detok = Detokenizer(codec)
    pieces = chunks_of(ids, rng)
    out = [detok.push(p, final=(k == len(pieces) - 1)) for k, p in enumerate(pieces)]
    full = codec.decode(ids)
    assert "".join(out) == full
    if "\ufffd" not in full:  # a character split across pushes is never sent half-decoded
        assert all("\ufffd" not in d for d in out)


@pytest.mark.parametrize("stop", ["print", "ö", "\n\n", "😀", "return 0"])
def test_stop_strings_cut_like_the_full_text(codec, stop):
    text = TEXTS[0] + TEXTS[1]
    ids = codec.encode(text)
    full = codec.decode(ids)
    detok = Detokenizer(codec, stop=[stop])
    out = []
    for k, p in enumerate(chunks_of(ids, random.Random(7))):
        out.append(detok.push(p, final=False))
        if detok.stopped:
            break
    assert detok.stopped and "".join(out) == full[: full.find(stop)]


@pytest.fixture(scope="module")
def random_codec(tmp_path_factory):
    return TextCodec.from_dir(write_random_checkpoint(tmp_path_factory.mktemp("text") / "m", seed=3))


@pytest.mark.parametrize("messages", [
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "tool"}],
])
def test_null_or_absent_content_renders_as_empty(random_codec, messages):
    text = random_codec.render_chat(messages)
    expected = "<s>" + "".join(f"<|{m['role']}|>\n{m.get('content') or ''}\n" for m in messages) + "<|assistant|>\n"
    assert text == expected
    assert random_codec.encode_chat(messages)


def test_a_template_error_is_still_reported(random_codec):
    broken = TextCodec(random_codec.tokenizer, "{{ raise_exception('no system turns') }}")
    with pytest.raises(ChatTemplateError, match="no system turns"):
        broken.render_chat([{"role": "user", "content": "x"}])
