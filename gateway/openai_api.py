"""OpenAI-compatible request and response models, plus the NLD extension fields.

Contract: request models mirror OpenAI's `/v1/completions` and `/v1/chat/completions` bodies;
unknown fields are ignored (like most OpenAI-compatible servers), known OpenAI features the
engine cannot honour are refused with 400 naming the field (`unsupported_features`) rather than
silently changing the output. Every text that reaches a replica (prompts, message contents and
names, stop strings) must be valid Unicode: JSON can carry a lone UTF-16 surrogate
(`"\\ud800"`, which JavaScript clients send when they cut a string inside a surrogate pair), and
such a string is refused with 400 naming the field (`Text`). A message's `content` may be null
or absent (tool and assistant turns): it reaches the chat template as "". Limits that depend on
the `GatewayConfig` (`n`, `max_tokens`, stop count) are checked by the service, and
`gateway.app` writes them into the OpenAPI schema.
Response models exist for the schema (`/openapi.json`); the service builds plain dicts with
the same shape for speed. Non-goals: tokenization, chat templates (the replica renders them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from replicas.wire import REQUESTED_MODES

# Integer bounds stay within 2**53 so that every JSON implementation (and JSON Schema validator)
# compares them exactly.
SEED_LIMIT = 2**53 - 1
TOKEN_ID_MAX = 2**31 - 1
DecodingMode = Literal[REQUESTED_MODES]  # "auto" or a mode (replicas.wire: the one vocabulary)


def _valid_unicode(v: str) -> str:
    """Refuse lone UTF-16 surrogates: they are not Unicode and cannot be encoded as UTF-8."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "invalid_unicode", "not valid Unicode: a lone UTF-16 surrogate ({char}) at character {at}; "
            "send a whole surrogate pair or well-formed UTF-8",
            {"char": f"\\u{ord(v[e.start]):04x}", "at": e.start}) from None
    return v


Text = Annotated[str, AfterValidator(_valid_unicode)]  # any text forwarded to the replicas
StopString = Annotated[Text, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0, le=TOKEN_ID_MAX)]
INT_FIELDS = ("max_tokens", "max_completion_tokens", "seed", "n", "block_length", "logprobs", "best_of", "top_logprobs",
              "top_k")


def _integral(v: Any) -> Any:
    """JSON Schema counts 1.0 as an integer; strict pydantic would not."""
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, list):
        return [_integral(x) for x in v]
    return v
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
# OpenAI is strict about types ("1" is not an integer); so are we. Unknown fields are ignored.
REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = REQUEST_CONFIG
    include_usage: bool = Field(default=False, description="send a last chunk with `usage` and empty `choices`")


class _SamplingRequest(BaseModel):
    model_config = REQUEST_CONFIG

    model: str = Field(description="the served model id (GET /v1/models)")
    max_tokens: int | None = Field(default=None, ge=1, le=1 << 30, description="tokens to generate at most")
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1 << 30,
                                              description="alias of max_tokens; wins when both are set")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 = greedy")
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-SEED_LIMIT, le=SEED_LIMIT,
                             description="choice i of a request uses seed + i")
    n: int = Field(default=1, ge=1, le=128, description="choices per prompt")
    stop: StopString | list[StopString] | None = Field(default=None, description="stop strings, excluded from the output")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, description="accepted for compatibility; not forwarded")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="only 0 is supported")
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0, description="only 0 is supported")
    logit_bias: dict[str, float] | None = Field(default=None, description="not supported (must be empty)")
    # NLD extensions
    decoding_mode: DecodingMode = Field(default="auto", description="NLD: decoding mode; auto = the gateway's policy")
    block_length: int | None = Field(default=None, ge=2, le=1 << 16,
                                     description="NLD: diffusion / self_spec block length (default: the model's)")
    confidence_threshold: float | None = Field(default=None, ge=0.0, le=1.0,
                                               description="NLD: diffusion unmasking threshold (default 0.9)")
    draft_lora: bool | None = Field(default=None, description="NLD: self_spec drafts with the LoRA (default: when loaded)")
    denoise_lora: bool | None = Field(default=None, description="NLD: diffusion denoise passes with the model's "
                                      "denoise adapter, diffusion_lora/ (default: when loaded)")
    self_spec_algorithm: Literal["linear", "quadratic"] | None = Field(
        default=None, description="NLD: self_spec algorithm: linear (draft, then verify: two forwards per cycle) or "
        "quadratic (draft and verify in one forward); default: the policy level's, else the replica's")
    # vLLM-compatible sampling extras
    top_k: int | None = Field(default=None, ge=0, le=1 << 20, description="sample from the k best tokens (0: all)")
    ignore_eos: bool | None = Field(default=None, description="keep generating past end-of-sequence tokens")

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in INT_FIELDS + ("prompt",):
                if key in data:
                    data[key] = _integral(data[key])
        return data

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def wants_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _common_unsupported(self) -> tuple[str, str] | None:
        if self.presence_penalty:
            return "presence_penalty", "presence_penalty is not supported (only 0)"
        if self.frequency_penalty:
            return "frequency_penalty", "frequency_penalty is not supported (only 0)"
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported"
        return None


class CompletionRequest(_SamplingRequest):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)] = Field(
        description="text, token ids, or a list of either (one choice set per prompt)")
    echo: bool | None = Field(default=None, description="not supported (must be false)")
    logprobs: int | None = Field(default=None, ge=0, le=20, description="not supported (must be null)")
    best_of: int | None = Field(default=None, ge=1, le=128, description="must equal n when set")
    suffix: str | None = Field(default=None, description="not supported (must be null)")

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return []
        if isinstance(p[0], int):
            return [p]  # one prompt of token ids
        return list(p)

    def unsupported_features(self) -> tuple[str, str] | None:
        if self.echo:
            return "echo", "echo is not supported"
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return self._common_unsupported()


class ContentPart(BaseModel):
    model_config = REQUEST_CONFIG
    type: str
    text: Text | None = None


class ChatMessageIn(BaseModel):
    model_config = REQUEST_CONFIG
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = Field(default=None, description="null or absent: empty")
    name: Text | None = None


class ResponseFormat(BaseModel):
    model_config = REQUEST_CONFIG
    type: str = "text"


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessageIn] = Field(min_length=1, description="rendered with the checkpoint's chat template")
    logprobs: bool | None = Field(default=None, description="not supported (must be false)")
    top_logprobs: int | None = Field(default=None, ge=0, le=20, description="not supported")
    tools: list[dict[str, Any]] | None = Field(default=None, description="not supported (must be empty)")
    tool_choice: str | dict[str, Any] | None = Field(default=None, description="only none/auto without tools")
    response_format: ResponseFormat | None = Field(default=None, description="only {\"type\": \"text\"}")

    def unsupported_features(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.top_logprobs:
            return "top_logprobs", "logprobs are not supported"
        if self.tools:
            return "tools", "tool calling is not supported"
        if self.tool_choice not in (None, "none", "auto"):
            return "tool_choice", "tool calling is not supported"
        if self.response_format is not None and self.response_format.type != "text":
            return "response_format", "only response_format {\"type\": \"text\"} is supported"
        for i, m in enumerate(self.messages):
            for j, part in enumerate(m.content if isinstance(m.content, list) else []):
                if part.type != "text" or part.text is None:
                    return f"messages[{i}].content[{j}]", "only text content parts are supported"
        return self._common_unsupported()

    def wire_messages(self) -> list[dict[str, Any]]:
        """Messages for the replica: text parts joined, null content as "", `name` kept when set."""
        out = []
        for m in self.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(p.text or "" for p in content)
            elif content is None:  # a tool or assistant turn without text: chat templates read content
                content = ""
            msg: dict[str, Any] = {"role": m.role, "content": content}
            if m.name is not None:
                msg["name"] = m.name
            out.append(msg)
        return out


# ---- responses (schema only; the service emits dicts of the same shape) -------------------

class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    forward_passes: int = Field(description="NLD: model forwards after prefill, summed over choices")
    tokens_per_forward: float = Field(description="NLD: completion_tokens / forward_passes")
    self_spec_algorithm: Literal["linear", "quadratic"] | None = Field(
        default=None, description="NLD: the self_spec algorithm that ran (null: no self_spec cycle ran)")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- the OpenAPI schema: what is actually supported ------------------------------------------
# The request models accept these OpenAI fields so that a refusal names them (400, `param`);
# the published schema lists only the values that are accepted.
_NULL = {"type": "null"}
SCHEMA_OVERRIDES: dict[str, dict[str, dict]] = {
    "_common": {
        "presence_penalty": {"anyOf": [{"const": 0}, _NULL]},
        "frequency_penalty": {"anyOf": [{"const": 0}, _NULL]},
        "logit_bias": {"anyOf": [{"type": "object", "maxProperties": 0}, _NULL]},
    },
    "CompletionRequest": {
        "echo": {"anyOf": [{"const": False}, _NULL]},
        "logprobs": _NULL,
        "best_of": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 1}, _NULL]},  # (any value equal to n)
        "suffix": {"anyOf": [{"type": "string", "maxLength": 0}, _NULL]},
    },
    "ChatCompletionRequest": {
        "logprobs": {"anyOf": [{"const": False}, _NULL]},
        "top_logprobs": {"anyOf": [{"const": 0}, _NULL]},
        "tools": {"anyOf": [{"type": "array", "maxItems": 0}, _NULL]},
        "tool_choice": {"anyOf": [{"enum": ["none", "auto"]}, _NULL]},
    },
    "ResponseFormat": {"type": {"const": "text", "default": "text"}},
    "ContentPart": {"type": {"const": "text"}, "text": {"type": "string"}},
}
