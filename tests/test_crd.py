"""The ModelDeployment CRD: generated files, Kubernetes validity, schema and CEL rules."""

from __future__ import annotations

import copy
import pathlib

import kubernetes_validate
import pytest
import yaml

from model_operator import crd, spec
from operator_fixtures.schema import admission_errors, cel_failures, schema_errors

ROOT = pathlib.Path(__file__).resolve().parent.parent
KUBERNETES_VERSIONS = [f"1.{minor}" for minor in range(29, 38)]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))

MINIMAL = {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}}
FULL = {
    "model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct", "revision": "0e9e39f", "servedName": "llama-8b",
              "hfTokenSecret": {"name": "hf-token", "key": "token"}},
    "engine": {"image": "registry.example/kubellm:1", "dtype": "bfloat16", "quantization": "awq",
               "kvCacheDtype": "fp8_e4m3", "maxModelLen": 8192,
               "tensorParallelSize": 2, "gpuMemoryUtilization": 0.92, "enablePrefixCaching": False,
               "maxNumSeqs": 128, "maxPendingRequests": 512, "shutdownTimeoutSeconds": 60,
               "extraArgs": ["--seed", "1"], "env": [{"name": "LOG_LEVEL", "value": "debug"}],
               "apiKeySecret": {"name": "api-key"}},
    "resources": {"gpus": 4, "gpuResourceName": "amd.com/gpu", "cpu": "8", "memory": "64Gi", "shmSize": "16Gi",
                  "nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "gpu", "operator": "Exists"}],
                  "affinity": {"nodeAffinity": {}}, "priorityClassName": "inference"},
    "cache": {"size": "100Gi", "storageClassName": "fast", "accessMode": "ReadWriteMany"},
    "replicas": 2,
    "autoscaling": {"enabled": True, "mode": "keda-http", "minReplicas": 0, "maxReplicas": 8,
                    "targetPendingRequests": 4, "prometheusAddress": "http://prom:9090", "scaleDownDelaySeconds": 60,
                    "http": {"hosts": ["llama.example.com", "*.llm.example.com"], "targetConcurrentRequests": 16,
                             "coldStartTimeoutSeconds": 1200, "scalerAddress": "http-scaler.keda-system:9090"}},
    "service": {"type": "LoadBalancer", "port": 8080},
    "rollout": {"strategy": "Recreate"},
}
ROUTED = {
    "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
    "replicas": 3,
    "autoscaling": {"enabled": True, "mode": "keda", "minReplicas": 2, "maxReplicas": 6},
    "routing": {"inferencePool": {"enabled": True, "endpointPicker": {"name": "qwen-epp", "port": 9002,
                                                                      "failureMode": "FailOpen"}},
                "httpRoute": {"parentRefs": [{"name": "inference-gateway", "namespace": "infra", "sectionName": "http"}],
                              "hostnames": ["llm.example.com"]}},
}


def document(model_spec: dict) -> dict:
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "m"}, "spec": model_spec}


def with_change(base: dict, path: str, value: object) -> dict:
    changed = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = changed
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return changed


def walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from walk(schema["items"], f"{path}[]")


@pytest.mark.parametrize("path", crd.DEFAULT_CRD_PATHS, ids=str)
def test_generated_files_match_the_python_source(path):
    assert (ROOT / path).read_text() == crd.render(), "regenerate with: python -m model_operator.crd --write"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_crd_is_a_valid_kubernetes_object(version):
    kubernetes_validate.validate(crd.crd(), version, strict=True)


def test_crd_names_scope_and_subresources():
    definition = crd.crd()["spec"]
    assert definition["names"]["shortNames"] == ["md"] and definition["names"]["categories"] == ["kubellm"]
    assert definition["scope"] == "Namespaced"
    version = definition["versions"][0]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == [
        "Model", "Phase", "Ready", "Replicas", "Endpoint", "Age"]


def test_schema_is_structural_and_documented():
    """Every field has a type (or is int-or-string) and a description for the README's reference."""
    spec_schema = crd.open_api_schema()["properties"]["spec"]
    for path, schema in walk(spec_schema, "spec"):
        assert "type" in schema or schema.get("x-kubernetes-int-or-string"), path
        assert schema.get("description", "").strip(), f"{path} has no description"


def test_defaults_are_valid_and_filled():
    filled = spec.with_defaults(MINIMAL)
    assert filled["model"]["revision"] == "main"
    assert filled["rollout"] == {"strategy": "RollingUpdate", "maxSurge": 0, "maxUnavailable": 1}
    assert filled["autoscaling"]["enabled"] is False and filled["service"]["port"] == 8000
    assert admission_errors(document(filled)) == []


@pytest.mark.parametrize("model_spec", [MINIMAL, FULL, ROUTED], ids=["minimal", "full", "routed"])
def test_valid_specs_are_admitted(model_spec):
    assert admission_errors(document(model_spec)) == []


@pytest.mark.parametrize("path,value,fragment", [
    ("model.source", "s3://bucket/model", "must start with hf://"),
    ("model.source", "hf://just-a-name", "hf://ORG/NAME"),
    ("model.source", "pvc://Bad_Claim/x", "pvc://CLAIM"),
    ("model.source", "file://relative/path", "must start with hf://"),
    ("resources.gpus", 3, "multiple of engine.tensorParallelSize"),
    ("resources.gpus", 0, "multiple of engine.tensorParallelSize"),
    ("autoscaling.minReplicas", 9, "must not exceed"),
    ("autoscaling.mode", "hpa", "needs mode keda-http"),
    ("autoscaling.mode", "keda", "needs mode keda-http"),
    ("cache.accessMode", "ReadOnlyMany", "cannot be ReadOnlyMany"),
])
def test_cross_field_rules_reject(path, value, fragment):
    failures = cel_failures(document(with_change(FULL, path, value)))
    assert any(fragment in failure for failure in failures), failures


@pytest.mark.parametrize("path,value,fragment", [
    ("routing.inferencePool.endpointPicker", None, "needs endpointPicker"),
    ("routing.inferencePool.enabled", False, "set routing.inferencePool.enabled"),
    ("autoscaling.mode", "keda-http", "past the InferencePool"),
])
def test_routing_rules_reject(path, value, fragment):
    changed = with_change(ROUTED, path, value)
    if value is None:
        *parents, leaf = path.split(".")
        node = changed
        for key in parents:
            node = node[key]
        del node[leaf]
    failures = cel_failures(document(changed))
    assert any(fragment in failure for failure in failures), failures


@pytest.mark.parametrize("path,value", [
    ("routing.httpRoute.parentRefs", []),
    ("routing.httpRoute.hostnames", ["Not A Host"]),
    ("routing.inferencePool.endpointPicker.failureMode", "Retry"),
    ("routing.inferencePool.endpointPicker.port", 0),
    ("autoscaling.http.hosts", ["http://x"]),
    ("autoscaling.http.scalerAddress", "scaler"),
    ("autoscaling.http.coldStartTimeoutSeconds", 1),
])
def test_schema_rejects_bad_routing_and_http_fields(path, value):
    assert schema_errors(document(with_change(ROUTED, path, value)))


def test_token_secret_only_with_hub_sources():
    bad = with_change(with_change(MINIMAL, "model.source", "pvc://models/llama"), "model.hfTokenSecret",
                      {"name": "t"})
    assert any("hfTokenSecret" in failure for failure in cel_failures(document(bad)))


def test_existing_claim_only_with_hub_sources():
    bad = with_change(with_change(MINIMAL, "model.source", "file:///models/x"), "cache.existingClaim", "c")
    assert any("existingClaim" in failure for failure in cel_failures(document(bad)))


@pytest.mark.parametrize("max_surge,max_unavailable,allowed", [
    (0, 0, False), ("0%", 0, False), (0, 1, True), (1, 0, True), ("25%", "0%", True)])
def test_rolling_update_needs_progress(max_surge, max_unavailable, allowed):
    rollout = {"strategy": "RollingUpdate", "maxSurge": max_surge, "maxUnavailable": max_unavailable}
    assert (cel_failures(document(with_change(MINIMAL, "rollout", rollout))) == []) is allowed


@pytest.mark.parametrize("path,value", [
    ("engine.dtype", "float64"),
    ("engine.quantization", "bitsandbytes"),
    ("engine.quantization", "FP8"),
    ("engine.kvCacheDtype", "fp8_e5m2"),
    ("engine.kvCacheDtype", "int8"),
    ("engine.gpuMemoryUtilization", 1.5),
    ("engine.tensorParallelSize", 0),
    ("replicas", -1),
    ("service.port", 70000),
    ("resources.memory", "lots"),
    ("engine.maxNumSeqs", "many"),
    ("engine.unknownField", 1),
])
def test_schema_rejects_bad_fields(path, value):
    assert schema_errors(document(with_change(MINIMAL, path, value)))


def test_engine_enums_are_the_engine_flag_choices():
    """The CRD lists --quantization and --kv-cache-dtype choices itself (the operator does not import the engine)."""
    from engine.layers.quantization.kv_cache import KV_CACHE_DTYPES
    from engine.layers.quantization.names import QUANTIZATION_METHODS

    engine = crd.engine_schema()["properties"]
    assert engine["quantization"]["enum"] == list(QUANTIZATION_METHODS)
    assert engine["kvCacheDtype"]["enum"] == list(KV_CACHE_DTYPES)


@pytest.mark.parametrize("name,allowed", [("llama", True), ("a" * 42, True), ("a" * 43, False),
                                          ("Llama", False), ("8b", False), ("llama.8b", False)])
def test_name_must_fit_child_names(name, allowed):
    named = {**document(MINIMAL), "metadata": {"name": name}}
    assert (cel_failures(named) == []) is allowed


def test_spec_requires_a_model_source():
    assert schema_errors(document({"model": {}}))
    assert schema_errors({"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "m"}})


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_admitted(path):
    examples = [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == crd.KIND]
    assert examples, f"{path.name} holds no {crd.KIND}"
    for example in examples:
        assert admission_errors(example) == [], path.name


def test_parse_source():
    assert spec.parse_source("hf://Qwen/Qwen2.5-0.5B") == spec.ModelSource("hf", repo="Qwen/Qwen2.5-0.5B")
    assert spec.parse_source("pvc://models/llama/8b/") == spec.ModelSource("pvc", claim="models", path="llama/8b")
    assert spec.parse_source("pvc://models") == spec.ModelSource("pvc", claim="models", path="")
    assert spec.parse_source("file:///opt/model") == spec.ModelSource("file", path="/opt/model")
    with pytest.raises(ValueError, match="must start with"):
        spec.parse_source("s3://x/y")
