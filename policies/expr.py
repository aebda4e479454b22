"""A tiny, safe arithmetic language over signal names for `mode.signal`.

Grammar: numbers, names, + - * /, unary -, parentheses, max(a, b, ...), min(a, b, ...).
Contract: `compile_expression(text)` parses once (raises ValueError on anything else) and
returns an `Expression` with `.names` and `evaluate(values: dict) -> float`. Division by
zero gives 0. Non-goals: anything Turing-complete; Python's eval is never used.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b if b else 0.0}
_FUNCS = {"max": max, "min": min}


@dataclass(frozen=True)
class Expression:
    text: str
    tree: ast.AST
    names: frozenset[str]

    def evaluate(self, values: dict[str, float]) -> float:
        return float(_eval(self.tree, values))


def compile_expression(text: str) -> Expression:
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"invalid expression {text!r}: {e.msg}") from None
    names: set[str] = set()
    _check(tree, names, text)
    return Expression(text, tree, frozenset(names))


def _check(node: ast.AST, names: set[str], text: str) -> None:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return
    if isinstance(node, ast.Name):
        names.add(node.id)
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        _check(node.left, names, text)
        _check(node.right, names, text)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        _check(node.operand, names, text)
        return
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and node.args and not node.keywords):
        for a in node.args:
            _check(a, names, text)
        return
    raise ValueError(f"invalid expression {text!r}: only numbers, signal names, + - * /, max() and min() are allowed")


def _eval(node: ast.AST, values: dict[str, float]) -> float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](_eval(node.left, values), _eval(node.right, values))
    if isinstance(node, ast.UnaryOp):
        v = _eval(node.operand, values)
        return -v if isinstance(node.op, ast.USub) else v
    return _FUNCS[node.func.id](*(_eval(a, values) for a in node.args))
