"""The text edge of a replica: tokenizer, chat template, incremental detokenisation, stop strings.

Contract: `TextCodec.from_dir(model_dir)` reads `tokenizer.json` and `tokenizer_config.json`;
`encode(text)` and `render_chat(messages)` give prompt ids (chat templates are rendered with a
sandboxed jinja2 environment the way Hugging Face does: `messages`, `add_generation_prompt`,
`bos_token`, `eos_token`, `raise_exception`; a message whose `content` is null or absent, as
OpenAI allows for tool and assistant turns, is rendered with "" so templates that read
`message['content']` never fail on it). `Detokenizer` turns a growing list of output ids
into text deltas, holding back incomplete UTF-8 and any tail that could start a stop string,
and reports when a stop string appears (the text is cut before it). Non-goals: token ids in
the engine (the engine never sees text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


class ChatTemplateError(ValueError):
    """The chat template could not be rendered for these messages."""


def _token_text(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} in some tokenizer_config files
        return value.get("content")
    return value


@dataclass
class TextCodec:
    tokenizer: Tokenizer
    chat_template: str
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "TextCodec":
        model_dir = Path(model_dir)
        tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        conf_path = model_dir / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
        template = conf.get("chat_template") or DEFAULT_CHAT_TEMPLATE
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        return cls(tok, template, _token_text(conf.get("bos_token")), _token_text(conf.get("eos_token")),
                   bool(conf.get("add_bos_token", False)))

    def __post_init__(self) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(self.chat_template)
        self._bos_id = self.tokenizer.token_to_id(self.bos_token) if self.bos_token else None

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos_token and self._bos_id is not None:
            ids = [self._bos_id] + ids
        return ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        messages = [m if m.get("content") is not None else {**m, "content": ""} for m in messages]
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except TemplateError as e:
            raise ChatTemplateError(f"messages: the chat template failed: {e}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _raise(message: str):
    raise TemplateError(message)


@dataclass
class Detokenizer:
    """Incremental text for one request's output ids.

    Each push decodes a short window (the ids of the previous push as context, then the new
    ones) and appends the difference, so a push costs the same at token 4,000 as at token 4;
    ids whose bytes do not yet form whole characters wait for the next push."""

    codec: TextCodec
    stop: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    text: str = ""  # the decoded text so far (before any stop-string cut)
    sent: int = 0  # characters of the text already returned
    stopped: bool = False
    _prefix: int = 0  # ids[_prefix:_read] are the context decoded with the next ids
    _read: int = 0  # ids before this are in `text`

    def push(self, new_ids: list[int], final: bool = False) -> str:
        """Add ids; return the text that became safe to send. Sets `stopped` on a stop string."""
        self.ids.extend(new_ids)
        context = self.codec.decode(self.ids[self._prefix:self._read])
        window = self.codec.decode(self.ids[self._prefix:])
        if len(window) > len(context) and (final or not window.endswith("\ufffd")):
            self.text += window[len(context):]
            self._prefix, self._read = self._read, len(self.ids)
        text = self.text
        for s in self.stop:
            at = text.find(s, max(0, self.sent - len(s) + 1))
            if at != -1:
                self.stopped = True
                text = text[:at]
        safe = len(text)
        if not (self.stopped or final):
            for s in self.stop:  # hold back a tail that may begin a stop string
                for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                    if text[safe - k : safe] == s[:k]:
                        safe -= k
                        break
        delta = text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return delta
