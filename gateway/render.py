"""OpenAI response bodies and stream chunks from upstream `GenerateChunk`s.

Contract: pure functions over plain dicts (no I/O): `completion_body` for non-streaming
responses, `stream_chunk` for one SSE chunk (chat: the first chunk of each choice carries
`role`; `usage: null` on every chunk when `stream_options.include_usage`), and `usage`, which
adds NLD's `forward_passes` (summed over choices) and `tokens_per_forward` to OpenAI's counts
(prompt tokens counted once per prompt, not once per choice). Finish reasons other than
`length` are reported as `stop`; errors never reach here. Non-goals: validation, transport.
"""

from __future__ import annotations

from replicas.wire import GenerateChunk, tokens_per_forward

from .plan import Plan


def _reason(c: GenerateChunk) -> str:
    return "length" if c.finish_reason == "length" else "stop"


def usage(plan: Plan, lasts: list[GenerateChunk | None]) -> dict:
    prompt = completion = passes = 0
    algorithm = None
    for index, c in enumerate(lasts):
        u = c.usage if c is not None else None
        if u is None:
            continue
        algorithm = algorithm or c.self_spec_algorithm
        if index % plan.n == 0:
            prompt += u.prompt_tokens
        completion += u.completion_tokens
        passes += u.forward_passes
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "forward_passes": passes, "tokens_per_forward": round(tokens_per_forward(completion, passes), 4),
            "self_spec_algorithm": algorithm}


def completion_body(plan: Plan, results: list[tuple[str, GenerateChunk]]) -> dict:
    """`results`: (full text, last chunk) per choice, in choice order."""
    choices = []
    for index, (text, last) in enumerate(results):
        if plan.chat:
            choices.append({"index": index, "message": {"role": "assistant", "content": text},
                            "finish_reason": _reason(last), "logprobs": None})
        else:
            choices.append({"index": index, "text": text, "finish_reason": _reason(last), "logprobs": None})
    return {"id": plan.id, "object": "chat.completion" if plan.chat else "text_completion",
            "created": plan.created, "model": plan.model, "choices": choices,
            "usage": usage(plan, [last for _, last in results])}


def stream_chunk(plan: Plan, base: dict, index: int, c: GenerateChunk, lasts: list, started: set) -> dict | None:
    """The OpenAI chunk for upstream chunk `c` of choice `index` (None: nothing to send).
    Records `c` in `lasts` when it finishes its choice and the choice in `started`."""
    reason = None
    if c.finish_reason is not None:
        lasts[index] = c
        reason = _reason(c)
    if plan.chat:
        delta: dict = {}
        if index not in started:  # the first chunk of a choice names the role
            started.add(index)
            delta["role"] = "assistant"
        if c.text or "role" in delta:
            delta["content"] = c.text
        if not delta and reason is None:
            return None
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        if not c.text and reason is None:
            return None
        choice = {"index": index, "text": c.text, "finish_reason": reason, "logprobs": None}
    payload = {**base, "choices": [choice]}
    if plan.include_usage:
        payload["usage"] = None
    return payload
