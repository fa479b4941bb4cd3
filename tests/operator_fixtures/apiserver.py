"""What kube-apiserver checks when a CustomResourceDefinition is created, for one openAPIV3Schema.

Mirrors apiextensions-apiserver's CRD validation as far as Python can:
- every `default` is valid for its own sub-schema (unknown fields included: defaults
  must be pruned) and passes that sub-schema's CEL rules exactly as written, without
  being filled with its properties' defaults first;
- the structural-schema rules (a type on every node, no `additionalProperties` beside
  `properties`, nothing but value checks inside anyOf/allOf/oneOf/not, no defaults
  under nullable fields or in metadata, list-map keys required or defaulted);
- CEL rules compile, read only fields the schema declares (the server type-checks
  them), point `fieldPath` at a declared field, and stay within the cost budget, as
  far as a size-based estimate of cel-go's cost model reaches.
Every function returns readable problems; an empty list means the server would accept.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterator

import celpy

from model_operator.defaulting import apply_schema_defaults
from operator_fixtures.schema import ENVIRONMENT, JUNCTORS, rule_failures, schema_errors

TYPES = {"object", "array", "string", "integer", "number", "boolean"}
# Only value validations may appear inside a junctor (structural schema rule 3).
JUNCTOR_FORBIDDEN = {"type", "description", "default", "additionalProperties", "nullable", "title",
                     "x-kubernetes-preserve-unknown-fields", "x-kubernetes-embedded-resource",
                     "x-kubernetes-int-or-string", "x-kubernetes-validations"}
# apiextensions-apiserver's limits (k8s.io/apiserver/pkg/apis/cel): one rule, and all rules of a CRD.
PER_CALL_COST_LIMIT = 1_000_000
CRD_COST_LIMIT = 100_000_000
# An unbounded string or list is sized by the largest request the server accepts (3 MiB).
MAX_REQUEST_BYTES = 3 * 1024 * 1024
STRING_TRAVERSAL_FACTOR = 0.1  # cel-go common.StringTraversalCostFactor
REGEX_LENGTH_FACTOR = 0.25  # cel-go common.RegexStringLengthCostFactor
# metadata at a resource's root: CEL sees only name and generateName, bounded like a DNS subdomain.
ROOT_METADATA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 253},
                                                  "generateName": {"type": "string", "maxLength": 253}}}

SELF_REFERENCE = re.compile(r"\bself((?:\.[A-Za-z_]\w*)*)(\s*\()?")
MATCHES_ARGUMENT = re.compile(r"\.matches\(\s*'((?:[^'\\]|\\.)*)'\s*\)")


def nodes(schema: dict, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every schema node with its path (`.field`, `[]` for items, `{}` for map values)."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from nodes(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from nodes(schema["additionalProperties"], f"{path}{{}}")
    if "items" in schema:
        yield from nodes(schema["items"], f"{path}[]")


# --- defaults -----------------------------------------------------------------------------------


def default_problems(schema: dict) -> list[str]:
    """Defaults the server would refuse: invalid for their sub-schema, or breaking its rules as written.

    Each rule is also evaluated on the fully defaulted value, which is what objects
    created without that field end up holding.
    """
    problems = []
    for path, node in nodes(schema):
        if "default" not in node:
            continue
        default = node["default"]
        problems += [f"{path}.default: {error}" for error in schema_errors(default, node)]
        problems += [f"as written: {failure}" for failure in rule_failures(node, default, f"{path}.default")]
        filled = apply_schema_defaults(node, copy.deepcopy(default))
        problems += [f"once defaulted: {failure}" for failure in rule_failures(node, filled, f"{path}.default")]
    return problems


# --- structural schema ---------------------------------------------------------------------------


def junctor_problems(path: str, node: dict, parent: dict) -> list[str]:
    problems = []
    for junctor in JUNCTORS:
        for index, branch in enumerate(node.get(junctor, [])):
            problems += junctor_problems(f"{path}.{junctor}[{index}]", branch, parent)
    if "not" in node:
        problems += junctor_problems(f"{path}.not", node["not"], parent)
    if node is parent:
        return problems
    int_or_string_branch = (parent.get("x-kubernetes-int-or-string") and set(node) == {"type"}
                            and node["type"] in ("integer", "string"))
    forbidden = set() if int_or_string_branch else JUNCTOR_FORBIDDEN & set(node)
    problems += [f"{path}: {key} inside a junctor" for key in sorted(forbidden)]
    problems += [f"{path}: property {name} inside a junctor is not in the parent's properties"
                 for name in node.get("properties", {}) if name not in parent.get("properties", {})]
    return problems


def structural_problems(schema: dict, preserve_unknown_paths: set[str]) -> list[str]:
    """Breaches of the structural-schema rules; `preserve_unknown_paths` lists where free-form is meant."""
    problems = []
    for path, node in nodes(schema):
        where = path or "(root)"
        int_or_string = node.get("x-kubernetes-int-or-string")
        preserves = node.get("x-kubernetes-preserve-unknown-fields")
        if node.get("type") not in TYPES and not int_or_string and not preserves:
            problems.append(f"{where}: no type")
        if int_or_string and ("type" in node or node.get("anyOf") not in (
                None, [{"type": "integer"}, {"type": "string"}])):
            problems.append(f"{where}: x-kubernetes-int-or-string must have no type, and anyOf only integer|string")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{where}: additionalProperties beside properties")
        if node.get("type") == "array" and "items" not in node:
            problems.append(f"{where}: array without items")
        if preserves and path not in preserve_unknown_paths:
            problems.append(f"{where}: x-kubernetes-preserve-unknown-fields where no free-form field is meant")
        if "default" in node and node.get("nullable"):
            problems.append(f"{where}: default on a nullable field")
        if path.startswith(".metadata") and ("default" in node or path.count(".") > 1):
            problems.append(f"{where}: metadata may only restrict name and generateName")
        if node.get("x-kubernetes-list-type") == "map":
            item = node.get("items", {})
            for key in node.get("x-kubernetes-list-map-keys", []):
                if key not in item.get("required", []) and "default" not in item.get("properties", {}).get(key, {}):
                    problems.append(f"{where}: list-map key {key} must be required or defaulted")
        problems += junctor_problems(where, node, node)
    missing = preserve_unknown_paths - {path for path, node in nodes(schema)
                                         if node.get("x-kubernetes-preserve-unknown-fields")}
    problems += [f"{path}: meant to be free-form but is not" for path in sorted(missing)]
    return problems


# --- CEL rules: compile, references, fieldPath, cost --------------------------------------------------


def resolve(node: dict, fields: list[str]) -> dict | None:
    """The sub-schema `fields` lead to from `node`, or None where the schema declares no such field."""
    for field in fields:
        if field in node.get("properties", {}):
            node = node["properties"][field]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


def rule_scope(path: str, node: dict) -> dict:
    """The node a rule sees as `self`: at a resource's root, metadata holds only name and generateName."""
    if path == "" and "metadata" in node.get("properties", {}):
        return {**node, "properties": {**node["properties"], "metadata": ROOT_METADATA}}
    return node


def references(expression: str) -> Iterator[tuple[list[str], str | None]]:
    """(field chain read from self, method called on it or None) for every `self...` in a rule."""
    for match in SELF_REFERENCE.finditer(expression):
        chain = [part for part in match.group(1).split(".") if part]
        method = chain.pop() if match.group(2) and chain else None
        yield chain, method


def string_size(node: dict) -> int:
    """Largest size the cost estimator assumes for a string node."""
    if "enum" in node:
        return max(len(str(value)) for value in node["enum"])
    return node.get("maxLength", MAX_REQUEST_BYTES)


def is_unbounded_string(node: dict) -> bool:
    stringy = node.get("type") == "string" or node.get("x-kubernetes-int-or-string")
    return bool(stringy) and "maxLength" not in node and "enum" not in node


def estimated_cost(expression: str, scope: dict) -> int:
    """cel-go's static estimate, reduced to what dominates it: traversing the strings a rule reads.

    Each read costs 1; a string function on a field traverses it (size x 0.1); `matches`
    multiplies that by the regex's length x 0.25.
    """
    regexes = iter(MATCHES_ARGUMENT.findall(expression))
    cost = 1
    for chain, method in references(expression):
        node = resolve(scope, chain) or {}
        cost += 1
        if method and (node.get("type") == "string" or node.get("x-kubernetes-int-or-string")):
            traversal = math.ceil(string_size(node) * STRING_TRAVERSAL_FACTOR)
            if method == "matches":
                regex = next(regexes, "")
                cost += traversal * max(1, math.ceil(len(regex) * REGEX_LENGTH_FACTOR))
            else:
                cost += traversal
    return cost


def cardinality(path: str, schema: dict) -> int:
    """How often a rule at `path` runs per object: the product of the enclosing lists' maxItems."""
    count, node = 1, schema
    for step in re.findall(r"\.[^.\[\]{}]+|\[\]|\{\}", path):
        if step == "[]":
            count *= node.get("maxItems", MAX_REQUEST_BYTES // 2)
            node = node["items"]
        elif step == "{}":
            count *= node.get("maxProperties", MAX_REQUEST_BYTES // 4)
            node = node["additionalProperties"]
        else:
            node = node["properties"][step[1:]]
    return count


def rule_problems(schema: dict) -> tuple[list[str], int]:
    """Problems the server would report for the CRD's rules, and their total estimated cost."""
    problems, total = [], 0
    for path, node in nodes(schema):
        scope = rule_scope(path, node)
        for validation in node.get("x-kubernetes-validations", []):
            expression, where = validation["rule"], path or "(root)"
            try:
                ENVIRONMENT.compile(expression)
            except celpy.CELParseError as error:
                problems.append(f"{where}: rule does not compile: {error}")
                continue
            for chain, method in references(expression):
                target = resolve(scope, chain)
                if target is None:
                    problems.append(f"{where}: rule reads undefined field self.{'.'.join(chain)}")
                elif method and is_unbounded_string(target):
                    problems.append(f"{where}: rule calls {method}() on self.{'.'.join(chain)}, a string without "
                                    f"maxLength (the server then sizes it at {MAX_REQUEST_BYTES} bytes)")
            field_path = validation.get("fieldPath")
            if field_path and resolve(scope, field_path.lstrip(".").split(".")) is None:
                problems.append(f"{where}: fieldPath {field_path} names no field of the schema")
            cost = estimated_cost(expression, scope)
            if cost > PER_CALL_COST_LIMIT:
                problems.append(f"{where}: estimated rule cost {cost} exceeds {PER_CALL_COST_LIMIT}")
            total += cost * cardinality(path, schema)
    if total > CRD_COST_LIMIT:
        problems.append(f"estimated total rule cost {total} exceeds {CRD_COST_LIMIT}")
    return problems, total
