"""The pure builders: every emitted object is valid Kubernetes, and says what the spec asks."""

from __future__ import annotations

import copy
import pathlib

import jsonschema
import pytest
import yaml
from kubernetes_validate.utils import schema_contents
from referencing import Registry, Resource

from model_operator import crd, resources, spec
from operator_fixtures.schema import admission_errors
from operator_fixtures.third_party import emitted_object_errors, validation_errors

KUBERNETES_VERSIONS = [f"1.{minor}" for minor in range(29, 38)]
EXAMPLES = sorted((pathlib.Path(__file__).resolve().parent.parent / "manifests" / "examples").glob("*.yaml"))
IMAGE = "ghcr.io/kubellm/kubellm-engine:test"
HUB = {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"}

SPECS = {
    "default": {"model": HUB},
    "hub-token-revision": {"model": {**HUB, "revision": "refs/pr/1", "servedName": "qwen",
                                     "hfTokenSecret": {"name": "hf", "key": "tok"}}},
    "pvc-source": {"model": {"source": "pvc://models/qwen/0.5b"}},
    "file-source": {"model": {"source": "file:///opt/models/qwen"}, "resources": {"gpus": 0}},
    "existing-claim": {"model": HUB, "cache": {"existingClaim": "shared-cache", "accessMode": "ReadWriteMany"}},
    "storage-class": {"model": HUB, "cache": {"storageClassName": "fast-ssd", "size": "200Gi",
                                              "accessMode": "ReadWriteMany"}},
    "engine-options": {"model": HUB, "engine": {
        "image": "registry.example/engine:2", "imagePullPolicy": "Always", "dtype": "bfloat16",
        "quantization": "fp8", "kvCacheDtype": "fp8", "maxModelLen": 4096, "tensorParallelSize": 2, "gpuMemoryUtilization": 0.85, "enablePrefixCaching": False,
        "maxNumSeqs": 64, "maxPendingRequests": 100, "shutdownTimeoutSeconds": 120, "extraArgs": ["--seed", "7"],
        "env": [{"name": "A", "value": "1"}, {"name": "B", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        "apiKeySecret": {"name": "keys", "key": "api-key"}}, "resources": {"gpus": 2}},
    "placement": {"model": HUB, "resources": {
        "gpus": 8, "gpuResourceName": "amd.com/gpu", "cpu": "16", "memory": "128Gi", "shmSize": "32Gi",
        "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "gpu", "operator": "In", "values": ["h100"]}]}]}}},
        "priorityClassName": "high"}},
    "cpu-only": {"model": HUB, "resources": {"gpus": 0, "cpu": "4", "memory": "8Gi"}},
    "replicated": {"model": HUB, "replicas": 3, "service": {"type": "LoadBalancer", "port": 9000}},
    "keda": {"model": HUB, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 5,
                                           "targetPendingRequests": 3, "scaleDownDelaySeconds": 600}},
    "keda-http": {"model": HUB, "autoscaling": {"enabled": True, "mode": "keda-http", "minReplicas": 0,
                                                "maxReplicas": 3, "http": {"targetConcurrentRequests": 12,
                                                                           "coldStartTimeoutSeconds": 1200}}},
    "keda-http-hosts": {"model": HUB, "autoscaling": {"enabled": True, "mode": "keda-http", "minReplicas": 0,
                                                      "http": {"hosts": ["qwen.example.com", "*.llm.example.com"],
                                                               "scalerAddress": "scaler.keda-system:9090"}}},
    "routed": {"model": HUB, "replicas": 2, "routing": {
        "inferencePool": {"enabled": True, "endpointPicker": {"name": "qwen-epp"}},
        "httpRoute": {"parentRefs": [{"name": "gw", "namespace": "infra", "sectionName": "https"}, {"name": "local"}],
                      "hostnames": ["qwen.example.com"]}}},
    "pool-only": {"model": HUB, "service": {"port": 9000}, "routing": {"inferencePool": {
        "enabled": True, "endpointPicker": {"name": "qwen-epp", "port": 9102, "failureMode": "FailOpen"}}}},
    "hpa": {"model": HUB, "replicas": 2, "autoscaling": {"enabled": True, "mode": "hpa", "minReplicas": 2,
                                                         "maxReplicas": 6}},
    "recreate": {"model": HUB, "rollout": {"strategy": "Recreate"}},
    "rolling-percent": {"model": HUB, "rollout": {"maxSurge": "25%", "maxUnavailable": "0%"}},
}


def body(model_spec: dict, name: str = "qwen") -> dict:
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND,
            "metadata": {"name": name, "namespace": "serving", "uid": "0f2a-uid"}, "spec": model_spec}


def build(model_spec: dict) -> dict[str, dict]:
    """The children by kind (at most one of each)."""
    objects = resources.children(resources.Target.from_body(body(model_spec)), IMAGE)
    by_kind = {obj["kind"]: obj for obj in objects}
    assert len(by_kind) == len(objects)
    return by_kind


def engine_container(model_spec: dict) -> dict:
    return build(model_spec)["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("name", SPECS)
def test_test_specs_are_admitted_by_the_crd(name):
    assert admission_errors(body(SPECS[name])) == []


def assert_valid_kubernetes(children: dict[str, dict], versions: list[str]) -> None:
    """Built-in kinds against every version's OpenAPI schema; KEDA's and other projects' kinds against their CRDs."""
    for obj in children.values():
        assert emitted_object_errors(obj, versions) == [], obj["kind"]


@pytest.mark.parametrize("name", SPECS)
def test_every_child_is_valid_kubernetes(name):
    assert_valid_kubernetes(build(SPECS[name]), KUBERNETES_VERSIONS)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_children_of_the_shipped_examples_are_valid_kubernetes(path):
    """The oldest and newest supported versions; every version is covered by the option matrix above."""
    for example in yaml.safe_load_all(path.read_text()):
        if example and example.get("kind") == crd.KIND:
            example["metadata"].setdefault("namespace", "default")
            example["metadata"]["uid"] = "example-uid"
            children = resources.children(resources.Target.from_body(example), IMAGE)
            assert_valid_kubernetes({child["kind"]: child for child in children}, ["1.29", "1.37"])


def test_default_spec_children():
    children = build(SPECS["default"])
    assert sorted(children) == ["Deployment", "Job", "PersistentVolumeClaim", "Service"]
    for obj in children.values():
        owner = obj["metadata"]["ownerReferences"][0]
        assert owner == {"apiVersion": "kubellm.io/v1alpha1", "kind": "ModelDeployment", "name": "qwen",
                         "uid": "0f2a-uid", "controller": True, "blockOwnerDeletion": True}
        assert obj["metadata"]["namespace"] == "serving"
        assert obj["metadata"]["labels"]["app.kubernetes.io/instance"] == "qwen"


def test_cache_pvc():
    pvc = build(SPECS["storage-class"])["PersistentVolumeClaim"]
    assert pvc["metadata"]["name"] == "qwen-model-cache"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "200Gi"}},
                           "storageClassName": "fast-ssd"}
    assert "storageClassName" not in build(SPECS["default"])["PersistentVolumeClaim"]["spec"]


@pytest.mark.parametrize("name", ["existing-claim", "pvc-source", "file-source"])
def test_no_cache_pvc_when_the_model_lives_elsewhere(name):
    assert "PersistentVolumeClaim" not in build(SPECS[name])


def test_fetch_job_for_hub_models():
    job = build(SPECS["hub-token-revision"])["Job"]
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert job["spec"]["backoffLimit"] == resources.FETCH_BACKOFF_LIMIT and pod["restartPolicy"] == "Never"
    assert container["command"] + container["args"] == [
        "kubellm", "fetch", "hf://Qwen/Qwen2.5-0.5B-Instruct", "--revision", "refs/pr/1",
        "--dest", "/models/hf/Qwen/Qwen2.5-0.5B-Instruct/refs--pr--1"]
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}} in container["env"]
    assert {"name": "model", "mountPath": "/models", "readOnly": False} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "qwen-model-cache"


def test_fetch_job_name_follows_what_the_job_runs():
    def job_name(model_spec):
        return build(model_spec)["Job"]["metadata"]["name"]

    default = SPECS["default"]
    assert job_name(default) == job_name(copy.deepcopy(default)) and job_name(default).startswith("qwen-fetch-")
    assert job_name(default) != job_name({"model": {**HUB, "revision": "v2"}})
    assert job_name(default) != job_name({"model": {**HUB, "hfTokenSecret": {"name": "t"}}})
    assert job_name(default) != job_name({**default, "engine": {"image": "other:1"}})
    assert job_name(default) == job_name({**default, "replicas": 3, "engine": {"maxNumSeqs": 8}})


def test_pvc_source_is_verified_in_place_read_only():
    children = build(SPECS["pvc-source"])
    job_container = children["Job"]["spec"]["template"]["spec"]["containers"][0]
    assert job_container["args"][-2:] == ["--dest", "/models/qwen/0.5b"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in job_container["volumeMounts"]
    assert children["Job"]["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
        "claimName": "models", "readOnly": True}
    assert engine_container(SPECS["pvc-source"])["args"][1] == "/models/qwen/0.5b"


def test_file_source_needs_no_job_and_no_volume():
    children = build(SPECS["file-source"])
    assert "Job" not in children
    container = children["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][1] == "/opt/models/qwen"
    assert all(mount["name"] != "model" for mount in container["volumeMounts"])


def test_engine_command_line_defaults():
    args = engine_container(SPECS["default"])["args"]
    assert args[:6] == ["serve", "/models/hf/Qwen/Qwen2.5-0.5B-Instruct/main", "--host", "0.0.0.0", "--port", "8000"]
    assert flag(args, "--served-model-name") == "qwen"
    assert flag(args, "--dtype") == "auto" and flag(args, "--tensor-parallel-size") == "1"
    assert flag(args, "--gpu-memory-utilization") == "0.9" and flag(args, "--max-num-seqs") == "256"
    assert "--enable-prefix-caching" in args and flag(args, "--shutdown-timeout") == "30"
    assert "--max-model-len" not in args and "--api-key-file" not in args
    assert flag(args, "--kv-cache-dtype") == "auto" and "--quantization" not in args


def test_engine_command_line_options():
    container = engine_container(SPECS["engine-options"])
    args = container["args"]
    assert container["image"] == "registry.example/engine:2" and container["imagePullPolicy"] == "Always"
    assert flag(args, "--dtype") == "bfloat16" and flag(args, "--max-model-len") == "4096"
    assert flag(args, "--quantization") == "fp8" and flag(args, "--kv-cache-dtype") == "fp8"
    assert flag(args, "--tensor-parallel-size") == "2" and flag(args, "--gpu-memory-utilization") == "0.85"
    assert "--no-enable-prefix-caching" in args and flag(args, "--max-pending-requests") == "100"
    assert flag(args, "--api-key-file") == "/etc/kubellm/api-key/api-key"
    assert args[-2:] == ["--seed", "7"]
    assert {"name": "A", "value": "1"} in container["env"]
    assert {"name": "api-key", "mountPath": "/etc/kubellm/api-key", "readOnly": True} in container["volumeMounts"]


def test_default_image_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(spec.ENGINE_IMAGE_ENV, "mirror.local/engine:9")
    assert spec.default_engine_image() == "mirror.local/engine:9"
    monkeypatch.delenv(spec.ENGINE_IMAGE_ENV)
    assert spec.default_engine_image() == spec.DEFAULT_ENGINE_IMAGE
    assert engine_container(SPECS["default"])["image"] == IMAGE


def test_engine_pod_gpus_shm_cache_and_placement():
    pod = build(SPECS["placement"])["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"] == {"requests": {"amd.com/gpu": 8, "cpu": "16", "memory": "128Gi"},
                                      "limits": {"amd.com/gpu": 8, "memory": "128Gi"}}
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in container["volumeMounts"]
    assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p5.48xlarge"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu" and pod["priorityClassName"] == "high"
    assert "nodeAffinity" in pod["affinity"]


def test_cpu_only_engine_requests_no_gpu():
    assert engine_container(SPECS["cpu-only"])["resources"] == {
        "requests": {"cpu": "4", "memory": "8Gi"}, "limits": {"memory": "8Gi"}}


def test_engine_probes_and_graceful_shutdown():
    pod = build(SPECS["engine-options"])["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/health", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] > 3600
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert pod["terminationGracePeriodSeconds"] > 120
    deadline = build(SPECS["engine-options"])["Deployment"]["spec"]["progressDeadlineSeconds"]
    assert deadline > startup["periodSeconds"] * startup["failureThreshold"]


def test_engine_pod_is_locked_down():
    pod = build(SPECS["default"])["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in pod["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_deployment_labels_annotations_and_rollout():
    deployment = build(SPECS["replicated"])["Deployment"]
    template = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == "kubellm"
    assert template["metadata"]["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "9000",
                                                   "prometheus.io/path": "/metrics"}
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate",
                                              "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert build(SPECS["recreate"])["Deployment"]["spec"]["strategy"] == {"type": "Recreate"}


def test_service_has_a_named_http_port():
    service = build(SPECS["replicated"])["Service"]
    assert service["metadata"]["name"] == "qwen" and service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": "http", "protocol": "TCP"}]
    assert service["spec"]["selector"] == build(SPECS["replicated"])["Deployment"]["spec"]["selector"]["matchLabels"]


def test_status_selector_matches_the_engine_pods():
    target = resources.Target.from_body(body(SPECS["default"]))
    pairs = dict(term.split("=") for term in resources.selector_string(target).split(","))
    assert pairs == resources.engine_selector(target)
    assert target.endpoint == "http://qwen.serving.svc:8000/v1"


def test_keda_scaled_object():
    children = build(SPECS["keda"])
    scaled = children["ScaledObject"]
    assert "HorizontalPodAutoscaler" not in children
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"] == {"apiVersion": "kubellm.io/v1alpha1", "kind": "ModelDeployment",
                                                "name": "qwen"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (1, 5)
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"] == {
        "serverAddress": "http://prometheus-operated.monitoring.svc:9090",
        "query": 'sum(kubellm_num_requests_waiting{namespace="serving",model_name="qwen"}) or vector(0)',
        "threshold": "3", "activationThreshold": "0"}
    assert all(isinstance(value, str) for value in trigger["metadata"].values())
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {"scaleDown": {"stabilizationWindowSeconds": 600}}
    for version in KUBERNETES_VERSIONS:  # KEDA hands `behavior` to its HPA unchanged
        definitions = schema_contents(f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json", version)
        registry = Resource.from_contents(definitions) @ Registry()
        schema = {"$ref": f"{definitions['$id']}#/$defs/io.k8s.api.autoscaling.v2.HorizontalPodAutoscalerBehavior"}
        jsonschema.Draft202012Validator(schema, registry=registry).validate(behavior)
    with pytest.raises(jsonschema.ValidationError):  # the check can fail
        jsonschema.Draft202012Validator(schema, registry=registry).validate({"scaleDown": {"window": 1}})


def test_scaled_object_is_valid_for_kedas_crd_and_the_check_is_strict():
    scaled = build(SPECS["keda"])["ScaledObject"]
    assert validation_errors(scaled) == []
    misspelled = copy.deepcopy(scaled)
    misspelled["spec"]["minReplicas"] = misspelled["spec"].pop("minReplicaCount")
    assert any("minReplicas" in error for error in validation_errors(misspelled))
    inverted = copy.deepcopy(scaled)
    inverted["spec"]["minReplicaCount"] = 9
    assert any("less than or equal to maxReplicaCount" in error for error in validation_errors(inverted))


def test_hpa_scales_the_model_deployment_on_waiting_requests():
    hpa = build(SPECS["hpa"])["HorizontalPodAutoscaler"]
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "ModelDeployment"
    assert hpa["spec"]["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "kubellm_num_requests_waiting"},
        "target": {"type": "AverageValue", "averageValue": "8"}}}]
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300


@pytest.mark.parametrize("name,expected", [("default", False), ("replicated", True), ("keda", True),
                                           ("hpa", True), ("keda-http", True)])
def test_pod_disruption_budget_only_when_several_replicas_may_run(name, expected):
    children = build(SPECS[name])
    assert ("PodDisruptionBudget" in children) is expected
    if expected:
        assert children["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1


def test_builders_do_not_modify_their_input():
    model_spec = copy.deepcopy(SPECS["engine-options"])
    build(model_spec)
    assert model_spec == SPECS["engine-options"]


# --- scale from zero (KEDA HTTP add-on) and routing (Gateway API Inference Extension) -------------------------


def test_keda_http_interceptor_route_and_scaled_object():
    children = build(SPECS["keda-http"])
    route, scaled = children["InterceptorRoute"], children["ScaledObject"]
    assert list(children).index("InterceptorRoute") < list(children).index("ScaledObject")  # KEDA asks about it
    assert route["apiVersion"] == "http.keda.sh/v1beta1"
    assert route["spec"]["target"] == {"service": children["Service"]["metadata"]["name"], "portName": "http"}
    assert "http" in {port["name"] for port in children["Service"]["spec"]["ports"]}
    assert route["spec"]["rules"] == [{"hosts": ["qwen.serving.svc"]}]
    assert route["spec"]["scalingMetric"] == {"concurrency": {"targetValue": 12}}
    assert route["spec"]["timeouts"] == {"readiness": "1200s"}
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (0, 3)
    assert scaled["spec"]["triggers"] == [{"type": "external-push", "name": "in-flight-requests", "metadata": {
        "scalerAddress": "keda-add-ons-http-external-scaler.keda:9090", "interceptorRoute": route["metadata"]["name"]}}]
    assert scaled["spec"]["scaleTargetRef"]["kind"] == crd.KIND


def test_keda_http_hosts_and_scaler_address():
    children = build(SPECS["keda-http-hosts"])
    assert children["InterceptorRoute"]["spec"]["rules"] == [{"hosts": ["qwen.example.com", "*.llm.example.com"]}]
    assert children["ScaledObject"]["spec"]["triggers"][0]["metadata"]["scalerAddress"] == "scaler.keda-system:9090"


def test_inference_pool_selects_the_engine_pods_on_their_port():
    children = build(SPECS["pool-only"])
    pool, template = children["InferencePool"], children["Deployment"]["spec"]["template"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    assert pool["spec"]["selector"]["matchLabels"] == children["Service"]["spec"]["selector"]
    (engine,) = template["spec"]["containers"]
    assert pool["spec"]["targetPorts"] == [{"number": engine["ports"][0]["containerPort"]}] == [{"number": 9000}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "qwen-epp", "port": {"number": 9102},
                                                 "failureMode": "FailOpen"}
    assert "HTTPRoute" not in children


def test_http_route_sends_everything_to_the_pool():
    children = build(SPECS["routed"])
    route, pool = children["HTTPRoute"], children["InferencePool"]
    assert route["spec"]["parentRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw", "namespace": "infra",
         "sectionName": "https"},
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "local"}]
    assert route["spec"]["hostnames"] == ["qwen.example.com"]
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": pool["metadata"]["name"]}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "qwen-epp", "port": {"number": 9002},
                                                 "failureMode": "FailClose"}


@pytest.mark.parametrize("kind,change,fragment", [
    ("InterceptorRoute", lambda o: o["spec"]["target"].update(port=8000), "exactly one of 'port' or 'portName'"),
    ("InterceptorRoute", lambda o: o["spec"]["scalingMetric"].update(concurrency={}), "targetValue"),
    ("InferencePool", lambda o: o["spec"]["endpointPickerRef"].pop("port"), "port is required"),
    ("InferencePool", lambda o: o["spec"].update(targetPorts=[{"number": 1}, {"number": 1}]), "must be unique"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(group="", kind="Service"),
     "Must have port"),
    ("HTTPRoute", lambda o: o["spec"]["rules"][0].update(timeout="1s"), "timeout"),
])
def test_third_party_checks_run_the_crds_rules_and_are_strict(kind, change, fragment):
    """Broken copies of emitted objects fail the real CRDs: their CEL rules, required fields, unknown fields."""
    children = build(SPECS["keda-http"] if kind == "InterceptorRoute" else SPECS["routed"])
    broken = copy.deepcopy(children[kind])
    change(broken)
    assert any(fragment in error for error in validation_errors(broken)), validation_errors(broken)
