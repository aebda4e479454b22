"""Typed builders for the chart's values schema (JSON Schema draft-07, the dialect Helm checks).

Contract: every builder returns one schema node (a `Node`, a JSON dict) with keyword arguments
named after what they mean (`min_length`, `exclusive_minimum`, ...), so a typo is a TypeError,
not a silently ignored schema key. `obj` forbids unknown keys unless `additional` says otherwise.
`from_model(pydantic model)` renders a model of the project (e.g. `replicas.config.EngineLimits`)
in the same dialect, so values that the code validates have one source. Non-goals: the values'
defaults and descriptions (values.yaml and its `# --` comments hold those).
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Sequence, Union

from pydantic import BaseModel

Node = dict[str, Any]
Type = Literal["object", "string", "integer", "number", "boolean", "array", "null"]


def _put(node: Node, **kw: Any) -> Node:
    names = {"min_length": "minLength", "max_length": "maxLength", "exclusive_minimum": "exclusiveMinimum",
             "exclusive_maximum": "exclusiveMaximum", "min_items": "minItems"}
    for key, value in kw.items():
        if value is not None:
            node[names.get(key, key)] = value
    return node


def string(*, min_length: int | None = None, max_length: int | None = None, pattern: str | None = None,
           enum: Sequence[str] | None = None, description: str | None = None) -> Node:
    return _put({"type": "string"}, min_length=min_length, max_length=max_length, pattern=pattern,
                enum=None if enum is None else list(enum), description=description)


def integer(*, minimum: int | None = None, maximum: int | None = None, description: str | None = None) -> Node:
    return _put({"type": "integer"}, minimum=minimum, maximum=maximum, description=description)


def number(*, minimum: float | None = None, maximum: float | None = None, exclusive_minimum: float | None = None,
           exclusive_maximum: float | None = None, description: str | None = None) -> Node:
    return _put({"type": "number"}, minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum,
                exclusive_maximum=exclusive_maximum, description=description)


def boolean(*, description: str | None = None) -> Node:
    return _put({"type": "boolean"}, description=description)


def null() -> Node:
    return {"type": "null"}


def any_of_types(*names: Type, minimum: float | None = None) -> Node:
    """A value of any of these JSON types (e.g. a number or null)."""
    return _put({"type": list(names)}, minimum=minimum)


def array(items: Node | None = None, *, min_items: int | None = None, description: str | None = None) -> Node:
    return _put({"type": "array"}, items=items, min_items=min_items, description=description)


def obj(properties: dict[str, Node] | None = None, *, required: Sequence[str] = (),
        additional: bool | Node | None = False, pattern_properties: dict[str, Node] | None = None,
        all_of: Sequence[Node] | None = None, description: str | None = None) -> Node:
    """An object; `additional`: False forbids unknown keys, a node types them, None says nothing."""
    node: Node = {"type": "object"}
    return _put(node, additionalProperties=additional, properties=properties, required=list(required) or None,
                patternProperties=pattern_properties, allOf=None if all_of is None else list(all_of),
                description=description)


def ref(name: str) -> Node:
    return {"$ref": f"#/definitions/{name}"}


def one_of(*alternatives: Node, description: str | None = None) -> Node:
    return _put({"oneOf": list(alternatives)}, description=description)


def enum(*values: Any) -> Node:
    return {"enum": list(values)}


def when(condition: Node, then: Node) -> Node:
    """`if` / `then`: `then` applies to values that match `condition`."""
    return {"if": condition, "then": then}


def shape(*, properties: dict[str, Node] | None = None, required: Sequence[str] = (), const: Any = None,
          min_items: int | None = None, min_length: int | None = None, type: Type | None = None) -> Node:
    """A partial node for `when` conditions and consequences (no type, no key restrictions)."""
    return _put({}, type=type, min_length=min_length, required=list(required) or None, properties=properties,
                const=const, min_items=min_items)


# ---- a project model, rendered in this dialect ------------------------------------------------

def from_model(model: type[BaseModel], *, description: str | None = None) -> Node:
    """`model`'s fields as an object node: unknown keys forbidden (the models forbid them), fields
    without a default required, `X | None` as one of null or X, `Literal` as an enum, numeric
    bounds from the fields' constraints."""
    props = {name: _field_node(f.annotation, f.metadata) for name, f in model.model_fields.items()}
    required = [name for name, f in model.model_fields.items() if f.is_required()]
    return obj(props, required=required, description=description)


def _field_node(annotation: Any, metadata: list) -> Node:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return one_of(null(), _field_node(args[0], metadata))
        raise TypeError(f"unsupported union {annotation!r}")
    if origin is Literal:
        return enum(*typing.get_args(annotation))
    if origin is list:
        (item,) = typing.get_args(annotation)
        return array(_field_node(item, []))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return from_model(annotation)
    bounds = _bounds(metadata)
    if annotation is bool:
        return boolean()
    if annotation is int:
        return integer(minimum=bounds.get("ge"), maximum=bounds.get("le"))
    if annotation is float:
        return number(minimum=bounds.get("ge"), maximum=bounds.get("le"), exclusive_minimum=bounds.get("gt"),
                      exclusive_maximum=bounds.get("lt"))
    if annotation is str:
        return string()
    raise TypeError(f"unsupported field type {annotation!r}")


def literal_values(model: type[BaseModel], field: str) -> list:
    """The values of a model's `Literal` field, e.g. `ReplicaConfig.device`: ["cpu", "cuda"]."""
    values = typing.get_args(model.model_fields[field].annotation)
    if not values:
        raise TypeError(f"{model.__name__}.{field} is not a Literal")
    return list(values)


def _bounds(metadata: list) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in metadata:
        for key in ("ge", "gt", "le", "lt"):
            if getattr(m, key, None) is not None:
                out[key] = getattr(m, key)
    return out
