"""Structural defaulting, as the Kubernetes API server applies a CRD schema's `default`s.

One implementation serves both sides: crd.py spells out object defaults with it
(the API server validates a `default` exactly as written, so `default: {}` on an
object whose rules read its fields would be rejected), and spec.py fills a
ModelDeployment's spec with it before the builders read it.
"""

from __future__ import annotations

import copy


def apply_schema_defaults(schema: dict, value: object) -> object:
    """Absent fields with a `default` get a copy of it, then defaulting recurses into every present field."""
    if isinstance(value, dict) and "properties" in schema:
        for field, field_schema in schema["properties"].items():
            if field not in value and "default" in field_schema:
                value[field] = copy.deepcopy(field_schema["default"])
            if field in value:
                value[field] = apply_schema_defaults(field_schema, value[field])
    elif isinstance(value, list) and "items" in schema:
        return [apply_schema_defaults(schema["items"], item) for item in value]
    return value


def defaults_of(schema: dict) -> dict:
    """What the API server makes of an absent object: its properties' defaults, recursively."""
    return apply_schema_defaults(schema, {})
