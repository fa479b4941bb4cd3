"""Check a custom object the way the API server would: structural schema, then CEL rules.

The openAPIV3Schema is turned into a JSON Schema (unknown fields rejected, as
`kubectl apply` with strict field validation does) and every
x-kubernetes-validations rule is evaluated with cel-python on the defaulted
object, so tests exercise the CRD's own rules rather than a Python copy of them.
"""

from __future__ import annotations

import copy

import celpy
import jsonschema

from model_operator import crd, spec


def to_json_schema(schema: dict) -> dict:
    converted = {key: value for key, value in schema.items() if not key.startswith("x-kubernetes-")}
    if "properties" in schema:
        converted["properties"] = {name: to_json_schema(sub) for name, sub in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
            converted["additionalProperties"] = False
    if "items" in schema:
        converted["items"] = to_json_schema(schema["items"])
    return converted


def schema_errors(document: dict, schema: dict | None = None) -> list[str]:
    schema = to_json_schema(schema or crd.open_api_schema())
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(document)]


def _cel_failures(schema: dict, value: object, path: str, environment: celpy.Environment) -> list[str]:
    failures = []
    for validation in schema.get("x-kubernetes-validations", []):
        program = environment.program(environment.compile(validation["rule"]))
        result = program.evaluate({"self": celpy.json_to_cel(value)})
        if isinstance(result, Exception) or not bool(result):
            failures.append(f"{path}: {validation['message']}")
    if isinstance(value, dict):
        for field, sub in schema.get("properties", {}).items():
            if field in value:
                failures += _cel_failures(sub, value[field], f"{path}.{field}", environment)
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            failures += _cel_failures(schema["items"], item, f"{path}[{index}]", environment)
    return failures


def cel_failures(document: dict) -> list[str]:
    """Messages of the CEL rules a ModelDeployment document breaks, once its spec is defaulted."""
    defaulted = {**document, "spec": spec.with_defaults(document["spec"])}
    return _cel_failures(crd.open_api_schema(), defaulted, "", celpy.Environment())


def admission_errors(document: dict) -> list[str]:
    """Everything the API server would reject in a ModelDeployment document."""
    return schema_errors(document) or cel_failures(copy.deepcopy(document))
