"""The versioned JSON schema of `jacobprop bench --json`, and a small validator for it.

The schema is a JSON Schema (draft 2020-12) dict; `jacobprop bench
--print-schema` writes it out. `validate` checks a document against it with
the standard library alone (the keywords used here: type, properties,
required, additionalProperties, items, enum, minimum, const), so neither the
tests nor a user need the `jsonschema` package.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "SCHEMA", "validate", "SchemaError"]

#: Bump the major number when a field changes meaning or disappears, the minor
#: one when a field is added.
SCHEMA_VERSION = "1.0"

_NUMBER_OR_NULL = {"type": ["number", "null"]}
_STRING_OR_NULL = {"type": ["string", "null"]}

_CONFIG = {
    "type": "object",
    "required": ["batch", "width", "depth", "activation", "dtype", "in_features", "classes",
                 "n_params"],
    "properties": {
        "batch": {"type": "integer", "minimum": 1},
        "width": {"type": "integer", "minimum": 1},
        "depth": {"type": "integer", "minimum": 1},
        "activation": {"type": "string"},
        "dtype": {"enum": ["float64", "float32"]},
        "in_features": {"type": "integer", "minimum": 1},
        "classes": {"type": "integer", "minimum": 1},
        "n_params": {"type": "integer", "minimum": 1},
    },
    "additionalProperties": False,
}

_ROW = {
    "type": "object",
    "required": ["group", "workload", "path", "peer", "status", "reason", "median_s", "iqr_s",
                 "q1_s", "q3_s", "samples", "calls_per_sample", "ratio", "flops", "gflops",
                 "peak_fraction", "peak_memory_bytes", "deviation", "deviation_against"],
    "properties": {
        "group": {"type": "integer", "minimum": 0},
        "workload": {"enum": ["grad", "jacobian", "gradcheck", "ntk", "per-sample", "curvature"]},
        "path": {"type": "string"},
        "peer": _STRING_OR_NULL,
        "status": {"enum": ["ok", "skipped", "error"]},
        "reason": _STRING_OR_NULL,
        "median_s": _NUMBER_OR_NULL,
        "iqr_s": _NUMBER_OR_NULL,
        "q1_s": _NUMBER_OR_NULL,
        "q3_s": _NUMBER_OR_NULL,
        "samples": {"type": "array", "items": {"type": "number"}},
        "calls_per_sample": {"type": ["integer", "null"]},
        "ratio": _NUMBER_OR_NULL,
        "flops": _NUMBER_OR_NULL,
        "gflops": _NUMBER_OR_NULL,
        "peak_fraction": _NUMBER_OR_NULL,
        "peak_memory_bytes": {"type": ["integer", "null"]},
        "deviation": _NUMBER_OR_NULL,
        "deviation_against": _STRING_OR_NULL,
        "extra": {"type": "object"},
    },
    "additionalProperties": False,
}

_GROUP = {
    "type": "object",
    "required": ["index", "workload", "label", "config", "baseline", "deviation_against",
                 "matmul_bound"],
    "properties": {
        "index": {"type": "integer", "minimum": 0},
        "workload": {"enum": ["grad", "jacobian", "gradcheck", "ntk", "per-sample", "curvature"]},
        "label": {"type": "string"},
        "config": _CONFIG,
        "baseline": {"type": "string"},
        "deviation_against": {"type": "string"},
        "matmul_bound": {"type": "boolean"},
        "notes": {"type": "array", "items": {"type": "string"}},
        "extra": {"type": "object"},
    },
    "additionalProperties": False,
}

_TARGET = {
    "type": "object",
    "required": ["name", "measured", "limit", "relation", "met"],
    "properties": {
        "name": {"type": "string"},
        "measured": _NUMBER_OR_NULL,
        "limit": {"type": "number"},
        "relation": {"enum": ["<=", ">="]},
        "met": {"type": ["boolean", "null"]},
        "note": _STRING_OR_NULL,
    },
    "additionalProperties": False,
}

_BLAS = {
    "type": "object",
    "required": ["library", "version", "threads", "source"],
    "properties": {
        "library": {"type": "string"},
        "version": {"type": "string"},
        "architecture": {"type": "string"},
        "threads": {"type": "integer", "minimum": 0},
        "source": {"type": "string"},
    },
}

SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "jacobprop bench results",
    "type": "object",
    "required": ["schema_version", "tool", "command", "suite", "created_utc", "machine",
                 "matmul_peak_gflops", "method", "peers", "missing_peers", "groups", "rows",
                 "targets"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "tool": {"const": "jacobprop bench"},
        "command": {"type": "string"},
        "suite": _STRING_OR_NULL,
        "created_utc": {"type": "string"},
        "machine": {
            "type": "object",
            "required": ["cpu", "cores", "python", "numpy", "scipy", "jacobprop", "blas",
                         "env"],
            "properties": {
                "cpu": {"type": "string"},
                "cores": {"type": "integer", "minimum": 0},
                "platform": {"type": "string"},
                "python": {"type": "string"},
                "numpy": {"type": "string"},
                "scipy": {"type": "string"},
                "jacobprop": {"type": "string"},
                "blas": {"type": "array", "items": _BLAS},
                "env": {"type": "object"},
                "load_average": {"type": ["array", "null"], "items": {"type": "number"}},
            },
        },
        "matmul_peak_gflops": {"type": "object"},
        "method": {
            "type": "object",
            "required": ["repeats", "interleaved", "statistic", "spread", "memory",
                         "min_sample_seconds", "budget_seconds"],
            "properties": {
                "repeats": {"type": "integer", "minimum": 1},
                "interleaved": {"const": True},
                "statistic": {"const": "median"},
                "spread": {"const": "interquartile range"},
                "memory": {"type": "string"},
                "min_sample_seconds": {"type": "number"},
                "budget_seconds": {"type": "number"},
            },
        },
        "peers": {"type": "object"},
        "missing_peers": {"type": "array", "items": {"type": "string"}},
        "groups": {"type": "array", "items": _GROUP},
        "rows": {"type": "array", "items": _ROW},
        "targets": {"type": "array", "items": _TARGET},
        "elapsed_s": {"type": "number"},
    },
    "additionalProperties": False,
}


class SchemaError(ValueError):
    """A document does not match the schema; the message gives the JSON path."""


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
}


def _is_type(value, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def validate(document, schema: dict | None = None, path: str = "$") -> None:
    """Raise `SchemaError` naming the first place where `document` breaks `schema`.

    Parameters
    ----------
    document : object
        Parsed JSON (dicts, lists, str, int, float, bool, None).
    schema : dict, optional
        `SCHEMA` by default.
    path : str
        Where `document` sits in the enclosing document, for the message.
    """
    schema = SCHEMA if schema is None else schema
    if "const" in schema and document != schema["const"]:
        raise SchemaError(f"{path}: expected {schema['const']!r}, got {document!r}")
    if "enum" in schema and document not in schema["enum"]:
        raise SchemaError(f"{path}: expected one of {schema['enum']}, got {document!r}")
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(document, name) for name in names):
            raise SchemaError(
                f"{path}: expected {' or '.join(names)}, got {type(document).__name__} "
                f"{document!r:.60}"
            )
    if "minimum" in schema and _is_type(document, "number") and document < schema["minimum"]:
        raise SchemaError(f"{path}: expected >= {schema['minimum']}, got {document!r}")
    if isinstance(document, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in document:
                raise SchemaError(f"{path}: missing required key {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, value in document.items():
            if key in properties:
                validate(value, properties[key], f"{path}.{key}")
            elif extra is False:
                raise SchemaError(f"{path}: unexpected key {key!r}")
            elif isinstance(extra, dict):
                validate(value, extra, f"{path}.{key}")
    if isinstance(document, list) and "items" in schema:
        for index, item in enumerate(document):
            validate(item, schema["items"], f"{path}[{index}]")
