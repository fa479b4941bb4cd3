"""Check a custom object the way the API server would: defaulting, structural schema, then CEL rules.

An openAPIV3Schema is turned into a JSON Schema that rejects unknown fields (as
`kubectl apply` with strict field validation does), and every
x-kubernetes-validations rule is evaluated with cel-python on the defaulted
object, so tests exercise the CRD's own rules rather than a Python copy of them.
The same functions check kubellm's CRD and the third-party CRDs in ../shared/crds.
"""

from __future__ import annotations

import copy

import celpy
import jsonschema

from model_operator import crd
from model_operator.defaulting import apply_schema_defaults

JUNCTORS = ("anyOf", "allOf", "oneOf")
ENVIRONMENT = celpy.Environment()


def to_json_schema(schema: dict, at_root: bool = True, in_junctor: bool = False) -> dict:
    """The JSON Schema of an openAPIV3Schema node; objects reject fields their schema does not name.

    Junctors (anyOf/allOf/oneOf/not) only add value checks, so no strictness is added inside them;
    the root's metadata is ObjectMeta, which the API server checks itself.
    """
    converted = {key: value for key, value in schema.items()
                 if not key.startswith("x-kubernetes-") and key not in ("nullable", "default")}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in schema:
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in schema:
        converted["properties"] = {
            name: {"type": "object"} if at_root and name == "metadata" else to_json_schema(sub, False, in_junctor)
            for name, sub in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        converted["additionalProperties"] = to_json_schema(schema["additionalProperties"], False, in_junctor)
    elif (schema.get("type") == "object" and not in_junctor and "additionalProperties" not in schema
          and not schema.get("x-kubernetes-preserve-unknown-fields")):
        converted["additionalProperties"] = False
    if "items" in schema:
        converted["items"] = to_json_schema(schema["items"], False, in_junctor)
    for junctor in JUNCTORS:
        if junctor in schema:
            converted[junctor] = [to_json_schema(sub, False, True) for sub in converted[junctor]]
    if "not" in schema:
        converted["not"] = to_json_schema(schema["not"], False, True)
    if schema.get("nullable"):
        converted = {"anyOf": [{"type": "null"}, converted]}
    return converted


def schema_errors(document: object, schema: dict | None = None) -> list[str]:
    validator = jsonschema.Draft202012Validator(to_json_schema(schema or crd.open_api_schema()))
    return [f"{'.'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
            for error in validator.iter_errors(document)]


def evaluate_rule(expression: str, value: object) -> bool | str:
    """The rule's result on `value` as `self`, or why it could not be evaluated (as the server reports it)."""
    try:
        result = ENVIRONMENT.program(ENVIRONMENT.compile(expression)).evaluate({"self": celpy.json_to_cel(value)})
    except (celpy.CELParseError, celpy.CELEvalError) as error:
        return f"{error.args[0] if error.args else error} evaluating rule: {expression}"
    return bool(result)


def rule_failures(schema: dict, value: object, path: str = "") -> list[str]:
    """Every x-kubernetes-validations rule in `schema` that `value` breaks or cannot be evaluated on.

    Rules are checked wherever the value has a node, as the API server does; transition
    rules (oldSelf) do not run on create and are skipped.
    """
    failures = []
    for validation in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in validation["rule"]:
            continue
        result = evaluate_rule(validation["rule"], value)
        if result is not True:
            failures.append(f"{path or '(root)'}: {validation['message'] if result is False else result}")
    if isinstance(value, dict):
        for field, sub in schema.get("properties", {}).items():
            if field in value:
                failures += rule_failures(sub, value[field], f"{path}.{field}")
        if isinstance(schema.get("additionalProperties"), dict):
            for field, item in value.items():
                failures += rule_failures(schema["additionalProperties"], item, f"{path}.{field}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            failures += rule_failures(schema["items"], item, f"{path}[{index}]")
    return failures


def admit(document: dict, schema: dict) -> tuple[dict, list[str]]:
    """What a create does to `document`: defaulted, then checked against the schema and its rules.

    Returns the object as it would be stored and the reasons the server would reject it.
    """
    stored = apply_schema_defaults(schema, copy.deepcopy(document))
    return stored, schema_errors(stored, schema) or rule_failures(schema, stored)


def cel_failures(document: dict) -> list[str]:
    """Messages of the CEL rules a ModelDeployment document breaks, once it is defaulted."""
    schema = crd.open_api_schema()
    return rule_failures(schema, apply_schema_defaults(schema, copy.deepcopy(document)))


def admission_errors(document: dict) -> list[str]:
    """Everything the API server would reject in a ModelDeployment document."""
    return admit(document, crd.open_api_schema())[1]
