"""The ModelDeployment CustomResourceDefinition: the one source of its schema.

Everything else derives from `crd()`: manifests/crd.yaml and the chart's
charts/kubellm/crds/ file (regenerate with `python -m model_operator.crd --write`;
tests/test_crd.py fails when they drift), the defaults the operator applies
(spec.py walks this schema), and the README's configuration reference (every
field carries a description).

Cross-field rules are CEL (`x-kubernetes-validations`) so the API server rejects
a spec that cannot work before the operator ever sees it.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

import yaml

from model_operator.defaulting import defaults_of

GROUP = "kubellm.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]
CATEGORIES = ["kubellm"]

PHASES = ["Pending", "Downloading", "Loading", "Ready", "Degraded", "Failed"]
CONDITION_TYPES = ["ModelCached", "Available", "Progressing", "Autoscaling", "Routing"]
AUTOSCALING_MODES = ("keda", "hpa", "keda-http")
# The engine's --quantization and --kv-cache-dtype choices (tests/test_crd.py checks them against the engine's).
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "compressed-tensors")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")

DEFAULT_CRD_PATHS = (
    pathlib.Path("manifests/crd.yaml"),
    pathlib.Path("charts/kubellm/crds/modeldeployments.kubellm.io.yaml"),
)

# The Kubernetes resource.Quantity grammar ("8Gi", "500m", "1.5", "2e3").
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
HOSTNAME_PATTERN = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # optional wildcard
PERCENT_PATTERN = r"^[0-9]+%$"  # the string form of a Deployment's maxSurge / maxUnavailable
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


# --- schema vocabulary ------------------------------------------------------------


def string(description: str, **extra: Any) -> dict:
    return {"type": "string", "description": description, **extra}


def integer(description: str, **extra: Any) -> dict:
    return {"type": "integer", "description": description, **extra}


def number(description: str, **extra: Any) -> dict:
    return {"type": "number", "description": description, **extra}


def boolean(description: str, **extra: Any) -> dict:
    return {"type": "boolean", "description": description, **extra}


def int_or_string(description: str, **extra: Any) -> dict:
    return {
        "x-kubernetes-int-or-string": True,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "description": description,
        **extra,
    }


def quantity(description: str, **extra: Any) -> dict:
    return int_or_string(description, pattern=QUANTITY_PATTERN, **extra)


def array(description: str, items: dict, **extra: Any) -> dict:
    return {"type": "array", "description": description, "items": items, **extra}


def string_map(description: str) -> dict:
    return {"type": "object", "description": description, "additionalProperties": {"type": "string"}}


def free_form(description: str) -> dict:
    """A Kubernetes core type (Affinity, Toleration, EnvVar source) passed through as is."""
    return {"type": "object", "description": description, "x-kubernetes-preserve-unknown-fields": True}


def obj(description: str, properties: dict, required: tuple[str, ...] = (), rules: tuple[dict, ...] = (),
        defaulted: bool = False, **extra: Any) -> dict:
    """An object schema; `defaulted` makes an absent object its properties' defaults.

    The default is spelled out rather than `{}`: the API server checks each `default` against its
    schema and CEL rules exactly as written, so a rule reading a field of `{}` fails ("no such key")
    and the whole CRD is rejected. Filled in by the server, both spellings give the same object.
    """
    schema = {"type": "object", "description": description, "properties": properties, **extra}
    if required:
        schema["required"] = list(required)
    if rules:
        schema["x-kubernetes-validations"] = list(rules)
    if defaulted:
        schema["default"] = defaults_of(schema)
    return schema


def rule(expression: str, message: str, field_path: str | None = None) -> dict:
    """A CEL rule; `field_path` points the error at the field the user must change."""
    validation = {"rule": expression, "message": message}
    if field_path:
        validation["fieldPath"] = field_path
    return validation


def secret_key_ref(description: str, default_key: str) -> dict:
    return obj(description, {
        "name": string("Name of the Secret in the ModelDeployment's namespace.", pattern=DNS_SUBDOMAIN_PATTERN,
                       maxLength=253),
        "key": string("Key inside the Secret.", default=default_key, minLength=1, maxLength=253),
    }, required=("name",))


# --- spec -----------------------------------------------------------------------------


def model_schema() -> dict:
    return obj("Which model to serve and where its weights come from.", {
        "source": string(
            "Where the weights live: hf://ORG/NAME (downloaded from the Hugging Face Hub into the cache), "
            "pvc://CLAIM/PATH (a folder on an existing PersistentVolumeClaim, verified in place) or "
            "file:///PATH (a folder already present in the engine container, e.g. baked into the image).",
            minLength=6, maxLength=512),
        "revision": string("Hub revision (branch, tag or commit) to download; only used with hf:// sources. "
                           "Each revision is cached in its own folder.", default="main", minLength=1,
                           maxLength=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"),
        "servedName": string("Model name clients send in OpenAI requests (the `model` field). "
                             "Defaults to the ModelDeployment's name.", minLength=1, maxLength=128,
                             pattern=r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$"),
        "hfTokenSecret": secret_key_ref("Secret holding a Hugging Face access token, for gated or private "
                                        "models (hf:// sources only).", default_key="token"),
    }, required=("source",), rules=(
        rule("self.source.startsWith('hf://') || self.source.startsWith('pvc://') "
             "|| self.source.startsWith('file:///')",
             "model.source must start with hf://, pvc:// or file:///", ".source"),
        rule("!self.source.startsWith('hf://') || self.source.matches('^hf://[A-Za-z0-9][A-Za-z0-9._-]*/"
             "[A-Za-z0-9][A-Za-z0-9._-]*$')",
             "an hf:// source must look like hf://ORG/NAME", ".source"),
        rule("!self.source.startsWith('pvc://') || self.source.matches('^pvc://[a-z0-9]([-a-z0-9.]*[a-z0-9])?"
             "(/[^/]+)*/?$')",
             "a pvc:// source must look like pvc://CLAIM or pvc://CLAIM/PATH", ".source"),
        rule("!has(self.hfTokenSecret) || self.source.startsWith('hf://')",
             "hfTokenSecret only applies to hf:// sources", ".hfTokenSecret"),
    ))


def engine_schema() -> dict:
    return obj("Engine container settings (flags of `kubellm serve`).", {
        "image": string("Engine container image. Defaults to the operator's KUBELLM_DEFAULT_ENGINE_IMAGE.",
                        minLength=1, maxLength=512),
        "imagePullPolicy": string("Image pull policy of the engine and download containers.",
                                  enum=["Always", "IfNotPresent", "Never"], default="IfNotPresent"),
        "dtype": string("Weight and activation dtype; auto takes the checkpoint's (bfloat16 for quantized GGUF "
                        "files, and on CPU for float16 ones).",
                        enum=["auto", "float16", "bfloat16", "float32"], default="auto"),
        "quantization": string("Weight quantization (`--quantization`); unset means what the checkpoint's "
                               "config.json says. fp8 on a 16-bit checkpoint quantizes it to FP8 while loading; "
                               "awq, gptq and compressed-tensors must match the checkpoint.",
                               enum=list(QUANTIZATION_METHODS)),
        "kvCacheDtype": string("KV-cache storage (`--kv-cache-dtype`): auto keeps the model's dtype; fp8 (or "
                               "fp8_e4m3) stores float8_e4m3fn with per-layer scales, about twice the tokens in "
                               "the same memory.", enum=list(KV_CACHE_DTYPES), default="auto"),
        "maxModelLen": integer("Longest sequence (prompt + output tokens) accepted; defaults to the "
                               "model's context length.", minimum=16, maximum=1048576),
        "tensorParallelSize": integer("GPUs one engine shards the model across; resources.gpus must be a "
                                      "multiple of it.", minimum=1, maximum=8, default=1),
        "gpuMemoryUtilization": number("Fraction of GPU memory the engine may use for weights, activations "
                                       "and the KV cache.", minimum=0.1, maximum=1.0, default=0.9),
        "enablePrefixCaching": boolean("Reuse KV cache blocks across requests sharing a prompt prefix.",
                                       default=True),
        "maxNumSeqs": integer("Most sequences scheduled in one engine step.", minimum=1, maximum=4096,
                              default=256),
        "maxPendingRequests": integer("Requests allowed to wait in the queue before the server answers 503; "
                                      "unset means unbounded.", minimum=1, maximum=1000000),
        "shutdownTimeoutSeconds": integer("Seconds a terminating engine keeps serving in-flight requests "
                                          "after SIGTERM; the pod's grace period is longer.", minimum=0,
                                          maximum=3600, default=30),
        "extraArgs": array("Extra `kubellm serve` flags, appended after the ones the operator sets.",
                           string("One command-line argument."), maxItems=64),
        "env": array("Extra environment variables of the engine container (Kubernetes EnvVar objects).",
                     obj("An environment variable.", {
                         "name": string("Variable name.", minLength=1, maxLength=256),
                         "value": string("Literal value."),
                         "valueFrom": free_form("Source of the value (EnvVarSource), e.g. a secretKeyRef."),
                     }, required=("name",)), maxItems=128, **{"x-kubernetes-list-type": "map",
                                                              "x-kubernetes-list-map-keys": ["name"]}),
        "apiKeySecret": secret_key_ref("Secret holding the API key clients must send as "
                                       "`Authorization: Bearer KEY`; unset means no authentication.",
                                       default_key="api-key"),
    }, defaulted=True)


def resources_schema() -> dict:
    return obj("Compute resources of each engine pod and where it may run.", {
        "gpus": integer("GPUs per engine pod (requests = limits). 0 runs the engine on CPU.", minimum=0,
                        maximum=16, default=1),
        "gpuResourceName": string("Extended resource name of the GPUs.", default="nvidia.com/gpu",
                                  pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*"
                                          r"[A-Za-z0-9])?$", maxLength=253),
        "cpu": quantity("CPU request of the engine container, e.g. 4 or 3500m."),
        "memory": quantity("Memory request and limit of the engine container, e.g. 32Gi."),
        "shmSize": quantity("Size of the in-memory /dev/shm (tensor-parallel workers exchange tensors "
                            "through it); counts against the pod's memory.", default="2Gi"),
        "nodeSelector": string_map("Node labels the engine pods must match."),
        "tolerations": array("Tolerations of the engine pods (Kubernetes Toleration objects).",
                             free_form("A Toleration."), maxItems=64),
        "affinity": free_form("Affinity of the engine pods (a Kubernetes Affinity object)."),
        "priorityClassName": string("PriorityClass of the engine pods.", pattern=DNS_SUBDOMAIN_PATTERN,
                                    maxLength=253),
    }, defaulted=True)


def cache_schema() -> dict:
    return obj("The PersistentVolumeClaim that caches hf:// downloads so restarts and new replicas do not "
               "download again. Unused for pvc:// and file:// sources.", {
                   "size": quantity("Size of the cache volume; must hold the model's weights.", default="50Gi"),
                   "storageClassName": string("StorageClass of the cache volume; the cluster default when "
                                              "unset.", pattern=DNS_SUBDOMAIN_PATTERN, maxLength=253),
                   "accessMode": string("Access mode of the cache volume. ReadWriteOnce volumes can only be "
                                        "mounted by pods on one node, so use ReadWriteMany (or ReadOnlyMany "
                                        "on an existingClaim) when replicas spread over nodes.",
                                        enum=["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod", "ReadOnlyMany"],
                                        default="ReadWriteOnce"),
                   "existingClaim": string("Use this PersistentVolumeClaim as the cache instead of creating one.",
                                           pattern=DNS_SUBDOMAIN_PATTERN, maxLength=253),
               }, defaulted=True, rules=(
                   rule("self.accessMode != 'ReadOnlyMany' || has(self.existingClaim)",
                        "a new cache volume cannot be ReadOnlyMany (the download writes to it); "
                        "use ReadOnlyMany only with existingClaim", ".accessMode"),
               ))


def http_autoscaling_schema() -> dict:
    return obj("Mode keda-http: the KEDA HTTP add-on's interceptor receives the requests, holds them while an "
               "engine starts, and reports in-flight requests to KEDA.", {
                   "hosts": array("Host headers the interceptor routes to this model; default NAME.NAMESPACE.svc "
                                  "(clients call the interceptor's proxy Service with that Host header).",
                                  string("A host name; *.example.com matches subdomains.", maxLength=253,
                                         pattern=HOSTNAME_PATTERN),
                                  minItems=1, maxItems=16),
                   "targetConcurrentRequests": integer("In-flight requests (held by the interceptor or running in "
                                                       "the engine) per replica that KEDA aims for.", minimum=1,
                                                       maximum=100000, default=32),
                   "coldStartTimeoutSeconds": integer("How long the interceptor holds a request while no engine is "
                                                      "ready (scale from zero: pod start plus model load).",
                                                      minimum=10, maximum=7200, default=900),
                   "scalerAddress": string("host:port of the add-on's external scaler that KEDA asks.",
                                           default="keda-add-ons-http-external-scaler.keda:9090", maxLength=253,
                                           pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?:[0-9]{1,5}$"),
               }, defaulted=True)


def autoscaling_schema() -> dict:
    return obj("Autoscaling on demand: queue depth (keda, hpa) or in-flight requests through the KEDA HTTP add-on "
               "(keda-http, which can also scale from zero).", {
                   "enabled": boolean("Create the autoscaler (a KEDA ScaledObject, plus an InterceptorRoute for "
                                      "keda-http, or an HPA); spec.replicas is then managed by the autoscaler "
                                      "through the scale subresource.", default=False),
                   "mode": string("keda: a KEDA ScaledObject with a Prometheus trigger on the engines' queue depth. "
                                  "hpa: an autoscaling/v2 HPA reading the same Pods metric through "
                                  "prometheus-adapter. keda-http: the KEDA HTTP add-on (an InterceptorRoute and a "
                                  "ScaledObject with its external-push trigger); the only mode that scales from "
                                  "zero.", enum=list(AUTOSCALING_MODES), default="keda"),
                   "minReplicas": integer("Fewest replicas; 0 (scale to zero) needs mode keda-http: with no engine "
                                          "running, only the interceptor sees (and holds) new requests.", minimum=0,
                                          maximum=1000, default=1),
                   "maxReplicas": integer("Most replicas.", minimum=1, maximum=1000, default=4),
                   "targetPendingRequests": integer("Waiting requests per replica the autoscaler aims for "
                                                    "(modes keda and hpa).", minimum=1, maximum=100000, default=8),
                   "prometheusAddress": string("Prometheus base URL KEDA queries (mode keda).",
                                               default="http://prometheus-operated.monitoring.svc:9090",
                                               pattern=r"^https?://[^\s/]+(/.*)?$", maxLength=512),
                   "scaleDownDelaySeconds": integer("How long the load must stay low before replicas are "
                                                    "removed (scale-down stabilization window).", minimum=0,
                                                    maximum=3600, default=300),
                   "http": http_autoscaling_schema(),
               }, defaulted=True, rules=(
                   rule("self.minReplicas <= self.maxReplicas",
                        "autoscaling.minReplicas must not exceed autoscaling.maxReplicas", ".minReplicas"),
                   rule("self.mode == 'keda-http' || self.minReplicas >= 1",
                        "minReplicas 0 (scale to zero) needs mode keda-http: with no engine running nothing else "
                        "reports demand or holds the first request", ".minReplicas"),
               ))


def routing_schema() -> dict:
    return obj("Load- and prefix-aware routing across replicas through the Gateway API Inference Extension.", {
        "inferencePool": obj("An InferencePool of the engine pods; its endpoint picker chooses a replica per "
                             "request by queue depth, KV-cache use and prefix affinity.", {
            "enabled": boolean("Create the InferencePool.", default=False),
            "endpointPicker": obj("The endpoint picker (EPP) Service serving this pool, deployed beside it "
                                  "(e.g. with the extension's inferencepool chart, --pool-name NAME).", {
                "name": string("Name of the picker's Service in the ModelDeployment's namespace.",
                               pattern=DNS_LABEL_PATTERN, maxLength=63),
                "port": integer("The picker's ext-proc gRPC port on that Service.", minimum=1, maximum=65535,
                                default=9002),
                "failureMode": string("What the gateway does when the picker does not answer: FailClose "
                                      "rejects the request, FailOpen sends it to any pod of the pool.",
                                      enum=["FailClose", "FailOpen"], default="FailClose"),
            }, required=("name",)),
        }, defaulted=True, rules=(
            rule("!self.enabled || has(self.endpointPicker)",
                 "inferencePool.enabled needs endpointPicker (the Service of the picker deployed for this pool)",
                 ".endpointPicker"),
        )),
        "httpRoute": obj("An HTTPRoute from Gateways to the InferencePool; omit it to attach the pool yourself.", {
            "parentRefs": array("Gateways the route attaches to.", obj("A Gateway (or a listener of one).", {
                "name": string("Gateway name.", pattern=DNS_SUBDOMAIN_PATTERN, maxLength=253),
                "namespace": string("Gateway namespace; the ModelDeployment's by default.", pattern=DNS_LABEL_PATTERN,
                                    maxLength=63),
                "sectionName": string("Listener name inside the Gateway.", pattern=DNS_SUBDOMAIN_PATTERN,
                                      maxLength=253),
            }, required=("name",)), minItems=1, maxItems=32),
            "hostnames": array("Host names the route matches; all of the Gateway's when empty.",
                               string("A host name; *.example.com matches subdomains.", maxLength=253,
                                      pattern=HOSTNAME_PATTERN), maxItems=16),
        }, required=("parentRefs",)),
    }, defaulted=True, rules=(
        rule("!has(self.httpRoute) || self.inferencePool.enabled",
             "routing.httpRoute sends traffic to the InferencePool: set routing.inferencePool.enabled", ".httpRoute"),
    ))


def service_schema() -> dict:
    return obj("The Service in front of the engine pods (OpenAI API, /metrics).", {
        "type": string("Service type.", enum=["ClusterIP", "NodePort", "LoadBalancer"], default="ClusterIP"),
        "port": integer("Port of the Service and of the engine container.", minimum=1, maximum=65535,
                        default=8000),
    }, defaulted=True)


def rollout_schema() -> dict:
    return obj("How the engine Deployment replaces pods after a spec change.", {
        "strategy": string("RollingUpdate replaces pods one at a time; Recreate stops all old pods first "
                           "(needed when GPUs cannot hold two copies).", enum=["RollingUpdate", "Recreate"],
                           default="RollingUpdate"),
        "maxSurge": int_or_string("Extra pods during a rolling update, a number or a percentage. 0 by default: "
                                  "a surge pod on a full GPU node stays Pending.", default=0,
                                  pattern=PERCENT_PATTERN, maxLength=8),
        "maxUnavailable": int_or_string("Pods that may be unavailable during a rolling update, a number or a "
                                        "percentage.", default=1, pattern=PERCENT_PATTERN, maxLength=8),
    }, defaulted=True, rules=(
        rule("self.strategy != 'RollingUpdate' || !(string(self.maxSurge) in ['0', '0%'] "
             "&& string(self.maxUnavailable) in ['0', '0%'])",
             "maxSurge and maxUnavailable cannot both be 0", ".maxUnavailable"),
    ))


def spec_schema() -> dict:
    return obj("Desired state of a served model.", {
        "model": model_schema(),
        "engine": engine_schema(),
        "resources": resources_schema(),
        "cache": cache_schema(),
        "replicas": integer("Engine pods; the autoscaler sets it when autoscaling is enabled.", minimum=0,
                            maximum=1000, default=1),
        "autoscaling": autoscaling_schema(),
        "service": service_schema(),
        "rollout": rollout_schema(),
        "routing": routing_schema(),
    }, required=("model",), rules=(
        rule("self.resources.gpus == 0 ? self.engine.tensorParallelSize == 1 "
             ": self.resources.gpus % self.engine.tensorParallelSize == 0",
             "resources.gpus must be a multiple of engine.tensorParallelSize (and tensor parallelism needs GPUs)",
             ".resources.gpus"),
        rule("!has(self.cache.existingClaim) || self.model.source.startsWith('hf://')",
             "cache.existingClaim only applies to hf:// sources", ".cache.existingClaim"),
        rule("!(self.autoscaling.enabled && self.autoscaling.mode == 'keda-http' && self.routing.inferencePool.enabled)",
             "autoscaling mode keda-http sends requests through the HTTP add-on's interceptor to the Service, "
             "past the InferencePool; with routing use mode keda or hpa", ".routing.inferencePool.enabled"),
    ))


# --- status -----------------------------------------------------------------------------


def condition_schema() -> dict:
    return obj("A standard Kubernetes condition.", {
        "type": string("Condition type.", enum=CONDITION_TYPES),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "reason": string("Machine-readable CamelCase reason.", maxLength=1024),
        "message": string("Human-readable explanation.", maxLength=32768),
        "lastTransitionTime": string("When the status last changed.", format="date-time"),
        "observedGeneration": integer("metadata.generation the condition was computed for.", minimum=0),
    }, required=("type", "status"))


def status_schema() -> dict:
    return obj("Observed state, written by the operator.", {
        "phase": string("Pending, Downloading (the model cache is being filled), Loading (engines starting), "
                        "Ready (all replicas ready), Degraded (some replicas ready) or Failed (see message).",
                        enum=PHASES),
        "message": string("What the operator is waiting for, or what to fix when Failed."),
        "replicas": integer("Engine pods that exist (scale subresource).", minimum=0),
        "readyReplicas": integer("Engine pods passing their readiness probe.", minimum=0),
        "selector": string("Label selector of the engine pods (scale subresource, for HPAs)."),
        "endpoint": string("In-cluster OpenAI base URL."),
        "observedGeneration": integer("metadata.generation the status describes.", minimum=0),
        "conditions": array("ModelCached, Available, Progressing, Autoscaling and Routing.", condition_schema(),
                            **{"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}),
    })


# --- the CRD --------------------------------------------------------------------------


def printer_columns() -> list[dict]:
    return [
        {"name": "Model", "type": "string", "jsonPath": ".spec.model.source"},
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Ready", "type": "integer", "jsonPath": ".status.readyReplicas"},
        {"name": "Replicas", "type": "integer", "jsonPath": ".status.replicas"},
        {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]


def open_api_schema() -> dict:
    return obj("A model served by kubellm engines, with its cache, Service and autoscaler.", {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": spec_schema(),
        "status": status_schema(),
    }, required=("spec",), rules=(
        rule("self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$') && size(self.metadata.name) <= 42",
             "the name must be a DNS label of at most 42 characters (it names the Service, and child objects "
             "add suffixes)"),
    ))


def crd() -> dict:
    """The CustomResourceDefinition, as applied to a cluster."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "kubellm", "app.kubernetes.io/part-of": "kubellm"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": SINGULAR,
                      "shortNames": SHORT_NAMES, "categories": CATEGORIES},
            "versions": [{
                "name": VERSION,
                "served": True,
                "storage": True,
                "schema": {"openAPIV3Schema": open_api_schema()},
                "subresources": {
                    "status": {},
                    "scale": {"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
                              "labelSelectorPath": ".status.selector"},
                },
                "additionalPrinterColumns": printer_columns(),
            }],
        },
    }


def render() -> str:
    header = "# Generated by `python -m model_operator.crd --write` from operator/crd.py; do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_operator.crd",
                                     description="Print or write the ModelDeployment CRD.")
    parser.add_argument("--write", action="store_true",
                        help="write " + " and ".join(map(str, DEFAULT_CRD_PATHS)) + " (run from the repo root)")
    args = parser.parse_args(argv)
    text = render()
    if not args.write:
        sys.stdout.write(text)
        return 0
    for path in DEFAULT_CRD_PATHS:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
