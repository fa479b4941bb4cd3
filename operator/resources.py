"""PURE builders: a ModelDeployment -> the Kubernetes objects that serve it.

Each function takes the ModelDeployment body (metadata + spec) and returns plain
dicts ready to send to the API server, owner reference included, so the
handlers only compare and apply and the tests can validate every object offline.
Nothing here talks to a cluster or reads the clock.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from model_operator import crd, spec as specs

MODELS_DIR = "/models"
API_KEY_DIR = "/etc/kubellm/api-key"
RUN_AS_USER = 10001  # the kubellm user of the engine image (Dockerfile)
STARTUP_PROBE_PERIOD_SECONDS = 10
STARTUP_PROBE_FAILURES = 400  # 400 x 10 s: over an hour to load a large model before liveness applies
GRACE_BEYOND_SHUTDOWN_SECONDS = 15  # SIGKILL comes this long after the engine's own drain deadline
FETCH_BACKOFF_LIMIT = 4
WAITING_METRIC = "kubellm_num_requests_waiting"

LABEL_MODEL_DEPLOYMENT = f"{crd.GROUP}/model-deployment"
LABEL_COMPONENT = "app.kubernetes.io/component"
COMPONENT_ENGINE = "engine"
COMPONENT_CACHE = "model-cache"
COMPONENT_FETCH = "model-fetch"


@dataclass(frozen=True)
class Target:
    """The ModelDeployment being reconciled, with its spec defaulted."""

    name: str
    namespace: str
    uid: str
    spec: dict

    @classmethod
    def from_body(cls, body: dict) -> "Target":
        metadata = body["metadata"]
        return cls(metadata["name"], metadata["namespace"], metadata["uid"], specs.with_defaults(body["spec"]))

    @property
    def source(self) -> specs.ModelSource:
        return specs.parse_source(self.spec["model"]["source"])

    @property
    def served_name(self) -> str:
        return self.spec["model"].get("servedName") or self.name

    @property
    def port(self) -> int:
        return self.spec["service"]["port"]

    @property
    def endpoint(self) -> str:
        return f"http://{self.name}.{self.namespace}.svc:{self.port}/v1"


# --- names, labels and shared pieces ----------------------------------------------------


def cache_claim_name(target: Target) -> str | None:
    """The PVC the model lives on: created cache, existingClaim, the pvc:// claim, or None for file://."""
    source = target.source
    if source.scheme == "pvc":
        return source.claim
    if source.scheme == "file":
        return None
    return target.spec["cache"].get("existingClaim") or f"{target.name}-model-cache"


def model_dir(target: Target) -> str:
    """Where the engine finds the model folder inside its container."""
    source = target.source
    if source.scheme == "hf":
        revision = target.spec["model"]["revision"].replace("/", "--")
        return f"{MODELS_DIR}/hf/{source.repo}/{revision}"
    if source.scheme == "pvc":
        return f"{MODELS_DIR}/{source.path}".rstrip("/")
    return source.path


def fetch_job_name(target: Target, pod_template: dict) -> str:
    """Named after what it runs: a new source, revision, token or image is a new Job
    (a Job's template cannot change, and a failed Job must not block the fixed spec)."""
    digest = hashlib.sha256(json.dumps(pod_template, sort_keys=True).encode()).hexdigest()
    return f"{target.name}-fetch-{digest[:8]}"


def labels(target: Target, component: str) -> dict:
    return {
        "app.kubernetes.io/name": "kubellm",
        "app.kubernetes.io/instance": target.name,
        LABEL_COMPONENT: component,
        "app.kubernetes.io/part-of": "kubellm",
        "app.kubernetes.io/managed-by": "kubellm-operator",
        LABEL_MODEL_DEPLOYMENT: target.name,
    }


def engine_selector(target: Target) -> dict:
    return {LABEL_MODEL_DEPLOYMENT: target.name, LABEL_COMPONENT: COMPONENT_ENGINE}


def selector_string(target: Target) -> str:
    """The engine pods' selector as status.selector (scale subresource) spells it."""
    return ",".join(f"{key}={value}" for key, value in sorted(engine_selector(target).items()))


def metadata(target: Target, name: str, component: str) -> dict:
    return {
        "name": name,
        "namespace": target.namespace,
        "labels": labels(target, component),
        "ownerReferences": [{
            "apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": target.name, "uid": target.uid,
            "controller": True, "blockOwnerDeletion": True,
        }],
    }


def scale_target_ref(target: Target) -> dict:
    """Autoscalers scale the ModelDeployment (scale subresource), so spec.replicas has one writer."""
    return {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "name": target.name}


def pod_security_context() -> dict:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS_USER, "runAsGroup": RUN_AS_USER, "fsGroup": RUN_AS_USER,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}


def container_security_context() -> dict:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]}}


def scratch_volume() -> tuple[dict, dict]:
    """A writable /tmp (HOME, compiler caches): the root filesystem is read-only."""
    return {"name": "tmp", "emptyDir": {}}, {"name": "tmp", "mountPath": "/tmp"}


def model_volume(target: Target, read_only: bool) -> tuple[list[dict], list[dict]]:
    claim = cache_claim_name(target)
    if claim is None:
        return [], []
    # pvc:// sources and ReadOnlyMany caches are only ever read (the Job then just verifies them).
    read_only = read_only or target.source.scheme == "pvc" or target.spec["cache"]["accessMode"] == "ReadOnlyMany"
    volume = {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}
    return [volume], [{"name": "model", "mountPath": MODELS_DIR, "readOnly": read_only}]


def env_value(name: str, value: str) -> dict:
    return {"name": name, "value": value}


HOME_ENV = [env_value("HOME", "/tmp"), env_value("HF_HOME", "/tmp/hf-home")]


# --- children ----------------------------------------------------------------------------


def cache_pvc(target: Target) -> dict | None:
    """The model cache, unless the model lives elsewhere (existingClaim, pvc://, file://)."""
    cache = target.spec["cache"]
    if target.source.scheme != "hf" or cache.get("existingClaim"):
        return None
    pvc_spec = {"accessModes": [cache["accessMode"]], "resources": {"requests": {"storage": str(cache["size"])}}}
    if cache.get("storageClassName"):
        pvc_spec["storageClassName"] = cache["storageClassName"]
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(target, cache_claim_name(target), COMPONENT_CACHE), "spec": pvc_spec}


def fetch_job(target: Target, image: str) -> dict | None:
    """Fills the cache (hf://) or checks the folder (pvc://); a no-op when the revision is already complete."""
    source = target.source
    if source.scheme == "file":
        return None
    model = target.spec["model"]
    args = ["fetch", model["source"], "--revision", model["revision"], "--dest", model_dir(target)]
    env = list(HOME_ENV)
    if "hfTokenSecret" in model:
        secret = model["hfTokenSecret"]
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}}})
    volumes, mounts = model_volume(target, read_only=False)
    tmp_volume, tmp_mount = scratch_volume()
    container = {
        "name": "fetch", "image": image, "imagePullPolicy": target.spec["engine"]["imagePullPolicy"],
        "command": ["kubellm"], "args": args, "env": env, "volumeMounts": mounts + [tmp_mount],
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "4Gi"}},
        "securityContext": container_security_context(),
    }
    template = {
        "metadata": {"labels": labels(target, COMPONENT_FETCH)},
        "spec": {"restartPolicy": "Never", "securityContext": pod_security_context(),
                 "containers": [container], "volumes": volumes + [tmp_volume],
                 "enableServiceLinks": False, "automountServiceAccountToken": False},
    }
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": metadata(target, fetch_job_name(target, template), COMPONENT_FETCH),
        "spec": {"backoffLimit": FETCH_BACKOFF_LIMIT, "template": template},
    }


def serve_args(target: Target) -> list[str]:
    """`kubellm serve` flags (vLLM's names) for the engine container."""
    engine = target.spec["engine"]
    args = ["serve", model_dir(target), "--host", "0.0.0.0", "--port", str(target.port),
            "--served-model-name", target.served_name,
            "--dtype", engine["dtype"],
            "--kv-cache-dtype", engine["kvCacheDtype"],
            "--tensor-parallel-size", str(engine["tensorParallelSize"]),
            "--gpu-memory-utilization", str(engine["gpuMemoryUtilization"]),
            "--max-num-seqs", str(engine["maxNumSeqs"]),
            "--enable-prefix-caching" if engine["enablePrefixCaching"] else "--no-enable-prefix-caching",
            "--shutdown-timeout", str(engine["shutdownTimeoutSeconds"])]
    if "quantization" in engine:
        args += ["--quantization", engine["quantization"]]
    if "maxModelLen" in engine:
        args += ["--max-model-len", str(engine["maxModelLen"])]
    if "maxPendingRequests" in engine:
        args += ["--max-pending-requests", str(engine["maxPendingRequests"])]
    if "apiKeySecret" in engine:
        args += ["--api-key-file", f"{API_KEY_DIR}/{engine['apiKeySecret']['key']}"]
    return args + list(engine.get("extraArgs", []))


def engine_resources(target: Target) -> dict:
    wanted = target.spec["resources"]
    requests, limits = {}, {}
    if wanted["gpus"]:
        requests[wanted["gpuResourceName"]] = limits[wanted["gpuResourceName"]] = wanted["gpus"]
    if "cpu" in wanted:
        requests["cpu"] = str(wanted["cpu"])
    if "memory" in wanted:
        requests["memory"] = limits["memory"] = str(wanted["memory"])
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def probe(path: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 5}


def engine_pod_spec(target: Target, image: str) -> dict:
    engine, wanted = target.spec["engine"], target.spec["resources"]
    model_volumes, model_mounts = model_volume(target, read_only=True)
    tmp_volume, tmp_mount = scratch_volume()
    volumes = model_volumes + [tmp_volume, {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                                         "sizeLimit": str(wanted["shmSize"])}}]
    mounts = model_mounts + [tmp_mount, {"name": "dshm", "mountPath": "/dev/shm"}]
    if "apiKeySecret" in engine:
        secret = engine["apiKeySecret"]
        volumes.append({"name": "api-key", "secret": {"secretName": secret["name"],
                                                      "items": [{"key": secret["key"], "path": secret["key"]}]}})
        mounts.append({"name": "api-key", "mountPath": API_KEY_DIR, "readOnly": True})
    container = {
        "name": "engine", "image": image, "imagePullPolicy": engine["imagePullPolicy"],
        "command": ["kubellm"], "args": serve_args(target),
        "ports": [{"name": "http", "containerPort": target.port, "protocol": "TCP"}],
        "env": HOME_ENV + [env_value("HF_HUB_OFFLINE", "1")] + list(engine.get("env", [])),
        "volumeMounts": mounts,
        "startupProbe": probe("/health", STARTUP_PROBE_PERIOD_SECONDS, STARTUP_PROBE_FAILURES),
        "readinessProbe": probe("/ready", 5, 3),
        "livenessProbe": probe("/health", 10, 3),
        "securityContext": container_security_context(),
    }
    resources = engine_resources(target)
    if resources:
        container["resources"] = resources
    pod_spec = {
        "containers": [container], "volumes": volumes, "securityContext": pod_security_context(),
        "terminationGracePeriodSeconds": engine["shutdownTimeoutSeconds"] + GRACE_BEYOND_SHUTDOWN_SECONDS,
        "enableServiceLinks": False, "automountServiceAccountToken": False,
    }
    for field in ("nodeSelector", "tolerations", "affinity", "priorityClassName"):
        if wanted.get(field):
            pod_spec[field] = wanted[field]
    return pod_spec


def deployment_strategy(target: Target) -> dict:
    rollout = target.spec["rollout"]
    if rollout["strategy"] == "Recreate":
        return {"type": "Recreate"}
    return {"type": "RollingUpdate",
            "rollingUpdate": {"maxSurge": rollout["maxSurge"], "maxUnavailable": rollout["maxUnavailable"]}}


def engine_deployment(target: Target, image: str) -> dict:
    scrape = {"prometheus.io/scrape": "true", "prometheus.io/port": str(target.port), "prometheus.io/path": "/metrics"}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": metadata(target, target.name, COMPONENT_ENGINE),
        "spec": {
            "replicas": target.spec["replicas"],
            "selector": {"matchLabels": engine_selector(target)},
            "strategy": deployment_strategy(target),
            "revisionHistoryLimit": 3,
            # Past the startup probe's hour: a rollout is only "stuck" once a pod could not have loaded.
            "progressDeadlineSeconds": STARTUP_PROBE_PERIOD_SECONDS * STARTUP_PROBE_FAILURES + 600,
            "template": {"metadata": {"labels": labels(target, COMPONENT_ENGINE), "annotations": scrape},
                         "spec": engine_pod_spec(target, image)},
        },
    }


def service(target: Target) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": metadata(target, target.name, COMPONENT_ENGINE),
        "spec": {"type": target.spec["service"]["type"], "selector": engine_selector(target),
                 "ports": [{"name": "http", "port": target.port, "targetPort": "http", "protocol": "TCP"}]},
    }


def waiting_requests_query(target: Target) -> str:
    """PromQL for the queue depth of this ModelDeployment's engines (0 when none run yet)."""
    matcher = f'namespace="{target.namespace}",model_name={json.dumps(target.served_name)}'
    return f"sum({WAITING_METRIC}{{{matcher}}}) or vector(0)"


def scale_down_behavior(target: Target) -> dict:
    return {"scaleDown": {"stabilizationWindowSeconds": target.spec["autoscaling"]["scaleDownDelaySeconds"]}}


def autoscaler_mode(target: Target) -> str | None:
    """keda, hpa, keda-http, or None when autoscaling is off."""
    autoscaling = target.spec["autoscaling"]
    return autoscaling["mode"] if autoscaling["enabled"] else None


def interceptor_hosts(target: Target) -> list[str]:
    """Host headers the KEDA HTTP add-on's interceptor routes to this model."""
    return target.spec["autoscaling"]["http"].get("hosts") or [f"{target.name}.{target.namespace}.svc"]


def interceptor_route(target: Target) -> dict | None:
    """Mode keda-http: the HTTP add-on's interceptor forwards matching requests to the engine Service,
    holding them while no engine is ready, and counts them for the add-on's scaler."""
    if autoscaler_mode(target) != "keda-http":
        return None
    http = target.spec["autoscaling"]["http"]
    return {
        "apiVersion": "http.keda.sh/v1beta1", "kind": "InterceptorRoute",
        "metadata": metadata(target, target.name, COMPONENT_ENGINE),
        "spec": {
            "target": {"service": target.name, "portName": "http"},
            "rules": [{"hosts": interceptor_hosts(target)}],
            "scalingMetric": {"concurrency": {"targetValue": http["targetConcurrentRequests"]}},
            # Long enough for a pod to start and load the model; the response itself may then stream on.
            "timeouts": {"readiness": f"{http['coldStartTimeoutSeconds']}s"},
        },
    }


def scaling_triggers(target: Target) -> list[dict]:
    """keda: the engines' queue depth from Prometheus. keda-http: the add-on's scaler, which counts the
    requests the interceptor holds or forwards, so demand is seen even with zero engines."""
    autoscaling = target.spec["autoscaling"]
    if autoscaling["mode"] == "keda-http":
        return [{"type": "external-push", "name": "in-flight-requests",
                 "metadata": {"scalerAddress": autoscaling["http"]["scalerAddress"], "interceptorRoute": target.name}}]
    trigger_metadata = {"serverAddress": autoscaling["prometheusAddress"], "query": waiting_requests_query(target),
                        "threshold": str(autoscaling["targetPendingRequests"]), "activationThreshold": "0"}
    return [{"type": "prometheus", "name": "waiting-requests", "metadata": trigger_metadata}]


def scaled_object(target: Target) -> dict | None:
    if autoscaler_mode(target) not in ("keda", "keda-http"):
        return None
    autoscaling = target.spec["autoscaling"]
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": metadata(target, target.name, COMPONENT_ENGINE),
        "spec": {
            "scaleTargetRef": scale_target_ref(target),
            "minReplicaCount": autoscaling["minReplicas"], "maxReplicaCount": autoscaling["maxReplicas"],
            "cooldownPeriod": autoscaling["scaleDownDelaySeconds"],
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": scale_down_behavior(target)}},
            "triggers": scaling_triggers(target),
        },
    }


def horizontal_pod_autoscaler(target: Target) -> dict | None:
    if autoscaler_mode(target) != "hpa":
        return None
    autoscaling = target.spec["autoscaling"]
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(target, target.name, COMPONENT_ENGINE),
        "spec": {
            "scaleTargetRef": scale_target_ref(target),
            "minReplicas": autoscaling["minReplicas"], "maxReplicas": autoscaling["maxReplicas"],
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": WAITING_METRIC},
                "target": {"type": "AverageValue", "averageValue": str(autoscaling["targetPendingRequests"])}}}],
            "behavior": scale_down_behavior(target),
        },
    }


def max_replicas(target: Target) -> int:
    autoscaling = target.spec["autoscaling"]
    return autoscaling["maxReplicas"] if autoscaling["enabled"] else target.spec["replicas"]


def pod_disruption_budget(target: Target) -> dict | None:
    """Voluntary evictions (node drains) take engines down one at a time; pointless for one replica."""
    if max_replicas(target) <= 1:
        return None
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": metadata(target, target.name, COMPONENT_ENGINE),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": engine_selector(target)},
                 "unhealthyPodEvictionPolicy": "AlwaysAllow"},
    }


def inference_pool(target: Target) -> dict | None:
    """The engine pods as a Gateway API Inference Extension pool, routed by the named endpoint picker."""
    pool = target.spec["routing"]["inferencePool"]
    if not pool["enabled"]:
        return None
    picker = pool["endpointPicker"]
    return {
        "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
        "metadata": metadata(target, target.name, COMPONENT_ENGINE),
        "spec": {
            "selector": {"matchLabels": engine_selector(target)},
            "targetPorts": [{"number": target.port}],
            "endpointPickerRef": {"name": picker["name"], "port": {"number": picker["port"]},
                                  "failureMode": picker["failureMode"]},
        },
    }


def http_route(target: Target) -> dict | None:
    """Every path on the given Gateways to the InferencePool (the picker then chooses the pod)."""
    route = target.spec["routing"].get("httpRoute")
    if route is None:
        return None
    spec = {
        "parentRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway", **ref} for ref in route["parentRefs"]],
        "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/"}}],
                   "backendRefs": [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                    "name": target.name}]}],
    }
    if route.get("hostnames"):
        spec["hostnames"] = list(route["hostnames"])
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": metadata(target, target.name, COMPONENT_ENGINE), "spec": spec}


def engine_image(target: Target, default_image: str) -> str:
    return target.spec["engine"].get("image") or default_image


def children(target: Target, default_image: str) -> list[dict]:
    """Every object the ModelDeployment should own, in the order they are needed."""
    image = engine_image(target, default_image)
    # The InterceptorRoute goes first: KEDA asks the add-on's scaler about it when the ScaledObject appears.
    built = [cache_pvc(target), fetch_job(target, image), engine_deployment(target, image), service(target),
             interceptor_route(target), scaled_object(target), horizontal_pod_autoscaler(target),
             pod_disruption_budget(target), inference_pool(target), http_route(target)]
    return [child for child in built if child is not None]
