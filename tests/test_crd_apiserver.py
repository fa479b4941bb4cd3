"""The ModelDeployment CRD passes what kube-apiserver checks when the CRD is created.

A real API server rejected an earlier CRD (422) because `default: {}` on objects
whose CEL rules read their fields fails those rules as written; the emulator in
the handler tests checks nothing of the kind. These tests run the server's CRD
checks (operator_fixtures/apiserver.py) on the generated schema, and show on
small broken schemas that each check catches what it is for.
"""

from __future__ import annotations

import copy

import pytest

from model_operator import crd, resources, spec
from model_operator.defaulting import defaults_of
from operator_fixtures.apiserver import (CRD_COST_LIMIT, default_problems, nodes, rule_problems,
                                         structural_problems)
from operator_fixtures.schema import admit

# The free-form Kubernetes core types the CRD passes through (crd.free_form); nothing else may be.
FREE_FORM_PATHS = {".spec.engine.env[].valueFrom", ".spec.resources.tolerations[]", ".spec.resources.affinity"}

# What the API server stores for a ModelDeployment that gives only the required field; the
# operator's builders read these keys without fallbacks (spec.py, resources.py).
MINIMAL_SPEC = {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}}
MINIMAL_STORED_SPEC = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "revision": "main"},
    "engine": {"imagePullPolicy": "IfNotPresent", "dtype": "auto", "kvCacheDtype": "auto", "tensorParallelSize": 1,
               "gpuMemoryUtilization": 0.9, "enablePrefixCaching": True, "maxNumSeqs": 256,
               "shutdownTimeoutSeconds": 30},
    "resources": {"gpus": 1, "gpuResourceName": "nvidia.com/gpu", "shmSize": "2Gi"},
    "cache": {"size": "50Gi", "accessMode": "ReadWriteOnce"},
    "replicas": 1,
    "autoscaling": {"enabled": False, "mode": "keda", "minReplicas": 1, "maxReplicas": 4, "targetPendingRequests": 8,
                    "prometheusAddress": "http://prometheus-operated.monitoring.svc:9090",
                    "scaleDownDelaySeconds": 300,
                    "http": {"targetConcurrentRequests": 32, "coldStartTimeoutSeconds": 900,
                             "scalerAddress": "keda-add-ons-http-external-scaler.keda:9090"}},
    "service": {"type": "ClusterIP", "port": 8000},
    "rollout": {"strategy": "RollingUpdate", "maxSurge": 0, "maxUnavailable": 1},
    "routing": {"inferencePool": {"enabled": False}},
}


def schema() -> dict:
    return crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_every_default_is_valid_and_passes_its_rules_as_written():
    assert default_problems(schema()) == []


def test_object_defaults_are_what_the_server_would_fill_in():
    """Spelled-out object defaults change nothing: they equal `{}` filled with the properties' defaults."""
    defaulted_objects = [(path, node) for path, node in nodes(schema())
                         if node.get("type") == "object" and "default" in node]
    assert defaulted_objects
    for path, node in defaulted_objects:
        assert node["default"] == defaults_of(node), path


def test_schema_is_structural():
    assert structural_problems(schema(), FREE_FORM_PATHS) == []


def test_rules_compile_read_declared_bounded_fields_and_fit_the_cost_budget():
    problems, total_cost = rule_problems(schema())
    assert problems == []
    assert 0 < total_cost <= CRD_COST_LIMIT


def test_minimal_model_deployment_is_admitted_and_defaulted_as_the_operator_assumes():
    document = {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
                "metadata": {"name": "qwen", "namespace": "serving", "uid": "u-1"}, "spec": MINIMAL_SPEC}
    stored, errors = admit(document, schema())
    assert errors == []
    assert stored["spec"] == MINIMAL_STORED_SPEC
    assert spec.with_defaults(stored["spec"]) == stored["spec"], "the operator's defaulting adds nothing more"
    target = resources.Target(name="qwen", namespace="serving", uid="u-1", spec=stored["spec"])
    kinds = [child["kind"] for child in resources.children(target, spec.DEFAULT_ENGINE_IMAGE)]
    assert kinds == ["PersistentVolumeClaim", "Job", "Deployment", "Service"]


# --- each check catches the class of error it exists for -----------------------------------------------


def object_with_rule(default: dict) -> dict:
    return {"type": "object", "properties": {"mode": {"type": "string", "enum": ["a", "b"], "default": "a"}},
            "default": default, "x-kubernetes-validations": [{"rule": "self.mode == 'a'", "message": "mode a"}]}


def test_an_empty_default_whose_rule_reads_a_field_is_refused():
    """The 422 a real server gave: `default: {}` is checked as written, before its fields are filled."""
    (problem,) = default_problems(object_with_rule({}))
    assert "as written" in problem and "mode" in problem
    assert default_problems(object_with_rule({"mode": "a"})) == []


def test_a_default_breaking_its_rule_once_defaulted_is_refused():
    broken = object_with_rule({"mode": "a"})
    broken["x-kubernetes-validations"] = [{"rule": "self.mode == 'b'", "message": "mode b"}]
    assert any("mode b" in problem for problem in default_problems(broken))


def test_a_default_with_an_unknown_field_is_refused():
    assert any("extra" in problem for problem in default_problems(object_with_rule({"mode": "a", "extra": 1})))


@pytest.mark.parametrize("change,fragment", [
    (lambda s: s["properties"]["mode"].pop("type"), "no type"),
    (lambda s: s.update(additionalProperties={"type": "string"}), "additionalProperties beside properties"),
    (lambda s: s["properties"]["mode"].update({"x-kubernetes-preserve-unknown-fields": True}), "free-form"),
    (lambda s: s["properties"]["mode"].update(nullable=True), "default on a nullable field"),
    (lambda s: s.update(anyOf=[{"type": "object", "description": "x"}]), "inside a junctor"),
    (lambda s: s.update(anyOf=[{"properties": {"other": {}}}]), "not in the parent's properties"),
])
def test_structural_breaches_are_found(change, fragment):
    broken = object_with_rule({"mode": "a"})
    change(broken)
    assert any(fragment in problem for problem in structural_problems(broken, set())), fragment


@pytest.mark.parametrize("rule,fragment", [
    ("self.modes == 'a'", "undefined field self.modes"),
    ("self.name.matches('^[a-z]+$')", "without maxLength"),
    ("self.mode ==", "does not compile"),
])
def test_rule_breaches_are_found(rule, fragment):
    broken = object_with_rule({"mode": "a"})
    broken["properties"]["name"] = {"type": "string"}
    broken["x-kubernetes-validations"] = [{"rule": rule, "message": "m"}]
    problems, _ = rule_problems(broken)
    assert any(fragment in problem for problem in problems), problems


def test_a_rule_over_the_cost_budget_is_found():
    """A regex over a long string inside a long list costs more than the whole CRD may."""
    item = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 100000}},
            "x-kubernetes-validations": [{"rule": "self.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
                                          "message": "m"}]}
    problems, total = rule_problems({"type": "object", "properties": {"items": {"type": "array", "items": item}}})
    assert any("exceeds" in problem for problem in problems) and total > CRD_COST_LIMIT


def test_a_field_path_to_nowhere_is_found():
    broken = copy.deepcopy(object_with_rule({"mode": "a"}))
    broken["x-kubernetes-validations"][0]["fieldPath"] = ".modes"
    assert any("fieldPath" in problem for problem in rule_problems(broken)[0])
