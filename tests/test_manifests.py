"""manifests/: install.yaml is the chart's default render, and the examples cover what they promise.

(manifests/crd.yaml against operator/crd.py, and every example's admission by
the CRD schema and its CEL rules, are tested in tests/test_crd.py.)
"""

from __future__ import annotations

import kubernetes_validate
import pytest
import yaml

import gen_install_manifest
from helm_render import ROOT
from model_operator import crd, resources
from operator_fixtures.third_party import emitted_object_errors

EXAMPLES = ROOT / "manifests" / "examples"
KUBERNETES_VERSIONS = [f"1.{minor}" for minor in range(29, 38)]
ADAPTER_VALUES = EXAMPLES / "prometheus-adapter" / "values.yaml"


def example(name: str) -> resources.Target:
    """The example's ModelDeployment as the operator reads it (schema defaults applied)."""
    (document,) = yaml.safe_load_all((EXAMPLES / name).read_text())
    assert document["kind"] == crd.KIND
    metadata = {**document["metadata"], "namespace": "default", "uid": "example-uid"}
    return resources.Target.from_body({"metadata": metadata, "spec": document["spec"]})


def install_objects() -> list[dict]:
    return list(yaml.safe_load_all(gen_install_manifest.INSTALL_MANIFEST.read_text()))


def test_install_manifest_is_the_charts_default_render():
    assert gen_install_manifest.INSTALL_MANIFEST.read_text() == gen_install_manifest.render(), (
        "regenerate with: python tools/gen_install_manifest.py")


def test_install_manifest_has_namespace_rbac_and_operator():
    kinds = [document["kind"] for document in install_objects()]
    assert kinds[0] == "Namespace"
    assert {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment"} <= set(kinds)
    assert kinds.index("ServiceAccount") < kinds.index("Deployment")


def test_install_manifest_does_not_claim_helm_manages_it():
    for document in install_objects():
        assert not set(document["metadata"].get("labels", {})) & set(gen_install_manifest.HELM_ONLY_LABELS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_install_manifest_objects_are_valid(version):
    for document in install_objects():
        kubernetes_validate.validate(document, version, strict=True)


def test_examples_cover_cpu_one_gpu_tensor_parallel_autoscaling_and_routing():
    cpu = example("tiny-cpu.yaml")
    assert cpu.spec["resources"]["gpus"] == 0
    assert cpu.spec["resources"]["gpuResourceName"] not in str(resources.engine_resources(cpu))
    assert example("llama-3.1-8b-1gpu.yaml").spec["resources"]["gpus"] == 1
    tensor_parallel = example("llama-3.1-70b-tp4.yaml").spec
    assert tensor_parallel["engine"]["tensorParallelSize"] == 4 and tensor_parallel["resources"]["gpus"] == 4
    from_zero = example("scale-from-zero.yaml")
    assert resources.scaled_object(from_zero)["spec"]["minReplicaCount"] == 0
    assert resources.interceptor_route(from_zero) is not None
    routed = example("routed-inference-pool.yaml")
    assert resources.inference_pool(routed) is not None and resources.http_route(routed) is not None
    assert resources.scaled_object(routed)["spec"]["triggers"][0]["type"] == "prometheus"
    assert resources.horizontal_pod_autoscaler(example("hpa-prometheus-adapter.yaml")) is not None


def test_prometheus_adapter_rule_serves_the_metric_the_hpa_reads():
    hpa = resources.horizontal_pod_autoscaler(example("hpa-prometheus-adapter.yaml"))
    (metric,) = hpa["spec"]["metrics"]
    (rule,) = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert metric["type"] == "Pods" and rule["name"]["as"] == metric["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith(resources.WAITING_METRIC + "{")
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda path: path.name)
def test_every_child_the_operator_builds_from_an_example_is_valid(path):
    target = example(path.name)
    for child in resources.children(target, "registry.example.com/kubellm-engine:1"):
        assert emitted_object_errors(child, KUBERNETES_VERSIONS[-1:]) == [], child["kind"]
