"""A kernel's answer JSON Schema: what may be declared (checked when it is configured), and bounded matching.

A schema is accepted only when checking an answer against it always ends, quickly:
- references are local JSON pointers (`#/$defs/...`), never remote, and never recursive (no `$ref` that
  reaches itself or one of its ancestors, directly or through other references);
- keywords that move the base URI or resolve dynamically (`$id`, `$anchor`, `$dynamicRef`, ...) are refused;
- size, nesting depth and pattern length are bounded;
- every regular expression (`pattern`, `patternProperties`) runs on the `regex` engine with a time limit,
  so a pathological pattern fails the answer instead of hanging the evaluation.

Torch-free: the MCP server checks schemas with it at configure time, the worker matches answers with it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

MAX_SCHEMA_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_NODES = 5000
MAX_PATTERN_CHARS = 1000
PATTERN_TIMEOUT_S = 0.05  # per regular-expression search; an answer's strings are short
FORBIDDEN = ("$id", "$anchor", "$dynamicRef", "$dynamicAnchor", "$recursiveRef", "$recursiveAnchor", "$vocabulary")
DATA_KEYWORDS = ("const", "enum", "default", "examples")  # hold instance data, not subschemas


class SchemaProblem(ValueError):
    """The schema cannot be used as an answer schema; the message says why and what to change."""


def check_schema(schema: Any) -> None:
    """Refuse a schema that is invalid, remote, recursive, oversized or has an unusable pattern."""
    if not isinstance(schema, dict):
        raise SchemaProblem("output_schema must be a JSON object (a JSON Schema)")
    try:
        size = len(json.dumps(schema, allow_nan=False))
    except (ValueError, TypeError, RecursionError) as exc:
        raise SchemaProblem(f"output_schema is not plain JSON: {exc}") from exc
    if size > MAX_SCHEMA_BYTES:
        raise SchemaProblem(f"output_schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
    refs: list[tuple[tuple[str, ...], tuple[str, ...]]] = []
    patterns: list[str] = []
    nodes = 0
    for where, node in _walk(schema, ()):
        nodes += 1
        if nodes > MAX_NODES:
            raise SchemaProblem(f"output_schema has more than {MAX_NODES} nodes; simplify it")
        if len(where) > MAX_DEPTH:
            raise SchemaProblem(f"output_schema nests deeper than {MAX_DEPTH} levels at {_pointer(where)}")
        if not isinstance(node, dict):
            continue
        for key in FORBIDDEN:
            if key in node:
                raise SchemaProblem(
                    f"output_schema uses {key} at {_pointer(where)}; only local references to its own "
                    "definitions are allowed ($ref: '#/$defs/name')"
                )
        ref = node.get("$ref")
        if ref is not None:
            refs.append((where, _local_ref(ref, where)))
        if isinstance(node.get("pattern"), str):
            patterns.append(node["pattern"])
        if isinstance(node.get("patternProperties"), dict):
            patterns.extend(str(k) for k in node["patternProperties"])
            if _anywhere(schema, "unevaluatedProperties"):
                raise SchemaProblem(
                    "output_schema combines patternProperties with unevaluatedProperties; use "
                    "additionalProperties instead"
                )
    for where, target in refs:
        if _resolve(schema, target) is _MISSING:
            raise SchemaProblem(f"$ref at {_pointer(where)} points at {_pointer(target)}, which does not exist")
    _refuse_recursion(schema, refs)
    for pattern in patterns:
        _check_pattern(pattern)
    import jsonschema  # deferred: only kernels with an output schema need it

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaProblem(f"output_schema is not a valid JSON Schema: {exc.message}") from exc


def matches(answer: str, schema: dict[str, Any]) -> bool:
    """True when `answer` is JSON that satisfies `schema` (a schema `check_schema` accepted)."""
    try:
        instance = json.loads(answer)
    except ValueError:
        return False
    try:
        errors = _validator_class()(schema).iter_errors(instance)
        return next(errors, None) is None
    except (TimeoutError, RecursionError):
        return False  # a pattern ran out of time: the answer does not count as compliant


# ---------------------------------------------------------------------------------------------


class _Missing:
    pass


_MISSING = _Missing()


def _walk(node: Any, where: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield where, node
    if isinstance(node, dict):
        for key, value in node.items():
            if key not in DATA_KEYWORDS:
                yield from _walk(value, (*where, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, (*where, str(i)))


def _anywhere(schema: Any, keyword: str) -> bool:
    return any(isinstance(node, dict) and keyword in node for _, node in _walk(schema, ()))


def _pointer(where: tuple[str, ...]) -> str:
    return "#" + "".join("/" + p.replace("~", "~0").replace("/", "~1") for p in where)


def _local_ref(ref: Any, where: tuple[str, ...]) -> tuple[str, ...]:
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise SchemaProblem(
            f"$ref {ref!r} at {_pointer(where)} is not a local JSON pointer; output_schema may only reference its "
            "own definitions ('#/$defs/name'), never another document"
        )
    from urllib.parse import unquote

    parts = ref[2:].split("/") if ref != "#" else []
    return tuple(unquote(p).replace("~1", "/").replace("~0", "~") for p in parts)


def _resolve(schema: Any, target: tuple[str, ...]) -> Any:
    node = schema
    for part in target:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def _refuse_recursion(schema: Any, refs: list[tuple[tuple[str, ...], tuple[str, ...]]]) -> None:
    """A reference may not lead back to itself or to a schema that contains it."""
    inside = {where: [w for w, _ in refs if w[: len(target)] == target] for where, target in refs}
    for where, target in refs:
        if where[: len(target)] == target:
            raise SchemaProblem(
                f"$ref at {_pointer(where)} points at {_pointer(target)}, which contains it: recursive schemas "
                "are not allowed in output_schema"
            )
    state: dict[tuple[str, ...], int] = {}  # 1: on the current path, 2: done

    def visit(ref_at: tuple[str, ...]) -> None:
        state[ref_at] = 1
        for nxt in inside[ref_at]:
            if state.get(nxt) == 1:
                raise SchemaProblem(
                    f"$ref at {_pointer(nxt)} leads back to itself through other references: recursive schemas "
                    "are not allowed in output_schema"
                )
            if nxt not in state:
                visit(nxt)
        state[ref_at] = 2

    for where, _ in refs:
        if where not in state:
            visit(where)


def _check_pattern(pattern: str) -> None:
    import regex

    if len(pattern) > MAX_PATTERN_CHARS:
        raise SchemaProblem(
            f"a pattern in output_schema is {len(pattern)} characters; the limit is {MAX_PATTERN_CHARS}"
        )
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise SchemaProblem(f"pattern {pattern!r} in output_schema is not a valid regular expression: {exc}") from exc


def _search(pattern: str, text: str) -> bool:
    import regex

    return regex.search(pattern, text, timeout=PATTERN_TIMEOUT_S) is not None


_VALIDATOR: Any = None


def _validator_class() -> Any:
    """Draft 2020-12 with every regular expression on the time-limited engine."""
    global _VALIDATOR
    if _VALIDATOR is not None:
        return _VALIDATOR
    import jsonschema
    from jsonschema.exceptions import ValidationError

    def pattern(validator: Any, patrn: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
        if validator.is_type(instance, "string") and not _search(patrn, instance):
            yield ValidationError(f"{instance!r} does not match {patrn!r}")

    def pattern_properties(validator: Any, pp: dict[str, Any], instance: Any, schema: Any) -> Iterator[Any]:
        if not validator.is_type(instance, "object"):
            return
        for patrn, subschema in pp.items():
            for key, value in instance.items():
                if _search(patrn, key):
                    yield from validator.descend(value, subschema, path=key, schema_path=patrn)

    def additional_properties(validator: Any, ap: Any, instance: Any, schema: Any) -> Iterator[Any]:
        if not validator.is_type(instance, "object"):
            return
        properties = schema.get("properties", {})
        patterns = list(schema.get("patternProperties", {}))
        extras = [k for k in instance if k not in properties and not any(_search(p, k) for p in patterns)]
        if validator.is_type(ap, "object"):
            for extra in extras:
                yield from validator.descend(instance[extra], ap, path=extra)
        elif not ap and extras:
            yield ValidationError(f"additional properties are not allowed ({', '.join(map(repr, sorted(extras)))})")

    _VALIDATOR = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        jsonschema.Draft202012Validator,
        {"pattern": pattern, "patternProperties": pattern_properties, "additionalProperties": additional_properties},
    )
    return _VALIDATOR
