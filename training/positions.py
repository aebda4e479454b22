"""Where a prompt is cut in a Python file: the six prompt positions of the tiny model's
all-position evaluation (and of its all-position self-distillation).

Contract: `cut_points(text)` returns, per position kind, the character offsets where a prompt may
end (the continuation starts there); `prompt_at(enc, cut, length)` turns one into token ids: the
last `length` tokens that end at the first token boundary at or after the cut (so prompt and
continuation are the file's own tokenization, and the reference continuation is exact), no bos
(the gateway's /v1/completions adds none: `add_bos_token` is false).

The kinds, from the lines of the file (a line's cut is right after its newline):
- `file_start`: the prompt is the FIRST `length` tokens of the file (its cut is where they end).
- `after_def`: after a line `def ...:` / `async def ...:` (a complete signature on one line).
- `mid_body`: after a line of a function body (indented deeper than its def) that is neither
  the def line, a comment, blank, nor the body's last line.
- `inside_class`: after the blank line that precedes a method (`    def` / `    @`) of a class.
- `after_comment`: after a line whose stripped text starts with `#` (not the first line of the file).
- `after_except`: after a line `except ...:`.

Non-goals: a parser (a line scan is enough for cut points; strings that look like code count).
"""

from __future__ import annotations

import re

KINDS = ("file_start", "after_def", "mid_body", "inside_class", "after_comment", "after_except")

_DEF = re.compile(r"^(\s*)(async\s+)?def\s+\w+\s*\(.*\)\s*(->.*)?:\s*(#.*)?$")
_CLASS = re.compile(r"^(\s*)class\s+\w+.*:\s*(#.*)?$")
_EXCEPT = re.compile(r"^\s*except\b.*:\s*(#.*)?$")
_METHOD = re.compile(r"^(\s+)(def\s|async\s+def\s|@)")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def cut_points(text: str) -> dict[str, list[int]]:
    """Character offsets (end of a line, newline included) per kind; `file_start` is [0] (its
    prompt is the first tokens of the file, see `prompt_at`)."""
    lines = text.splitlines(keepends=True)
    ends = []
    pos = 0
    for line in lines:
        pos += len(line)
        ends.append(pos)
    out: dict[str, list[int]] = {k: [] for k in KINDS}
    out["file_start"] = [0]
    class_indent: list[int] = []  # indents of the enclosing class statements
    def_indent: int | None = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if stripped:
            ind = _indent(line)
            class_indent = [c for c in class_indent if c < ind]
            if def_indent is not None and ind <= def_indent:
                def_indent = None
        if _CLASS.match(line.rstrip("\n")):
            class_indent.append(_indent(line))
        m = _DEF.match(line.rstrip("\n"))
        if m:
            out["after_def"].append(ends[i])
            def_indent = _indent(line)
            continue
        if _EXCEPT.match(line.rstrip("\n")):
            out["after_except"].append(ends[i])
        if stripped.startswith("#") and i > 0:
            out["after_comment"].append(ends[i])
        elif (stripped and def_indent is not None and _indent(line) > def_indent and nxt.strip()
              and _indent(nxt) > def_indent and not stripped.startswith(("#", '"""', "'''"))):
            out["mid_body"].append(ends[i])
        if not stripped and class_indent and _METHOD.match(nxt) and _indent(nxt) > class_indent[-1]:
            out["inside_class"].append(ends[i])
    return out


def token_index(offsets: list[tuple[int, int]], cut: int) -> int:
    """Index of the first token that starts at or after character `cut` (len if none)."""
    for k, (start, _) in enumerate(offsets):
        if start >= cut:
            return k
    return len(offsets)


def prompt_at(ids: list[int], offsets: list[tuple[int, int]], kind: str, cut: int, length: int) -> tuple[int, int]:
    """(start, end) token indices of the prompt: for `file_start` the first `length` tokens, else
    the `length` tokens ending at the token boundary at or after `cut` (fewer if the file is
    shorter there). The continuation starts at `end`."""
    if kind == "file_start":
        end = min(length, len(ids))
        return 0, end
    end = token_index(offsets, cut)
    return max(0, end - length), end


def encode_with_offsets(tok, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, character offsets) of each text, no bos/eos."""
    return [(enc.ids, enc.offsets) for enc in tok.encode_batch(texts)]


def sample_position_prompts(encoded: list[tuple[list[int], list[tuple[int, int]]]], texts: list[str], n: int,
                            lengths: list[int], gen, min_tokens: int = 4) -> list[list[int]]:
    """n prompts from train files, the kind uniform over KINDS, the cut uniform among the file's
    cut points of that kind, the length uniform over `lengths` (shorter where the file is);
    a file without a cut point of the drawn kind is redrawn. Deterministic given `gen`
    (a torch.Generator)."""
    import torch

    cuts = [cut_points(t) for t in texts]
    prompts: list[list[int]] = []
    while len(prompts) < n:
        f = int(torch.randint(0, len(texts), (), generator=gen))
        kind = KINDS[int(torch.randint(0, len(KINDS), (), generator=gen))]
        length = lengths[int(torch.randint(0, len(lengths), (), generator=gen))]
        cands = cuts[f][kind]
        if not cands:
            continue
        cut = cands[int(torch.randint(0, len(cands), (), generator=gen))]
        ids, offsets = encoded[f]
        start, end = prompt_at(ids, offsets, kind, cut, length)
        if end - start >= min_tokens:
            prompts.append(list(ids[start:end]))
    return prompts
