"""A small JSON client for exactly the Kubernetes resources the operator touches.

The builders produce plain dicts, so the operator talks plain JSON over the
`kubernetes` package's authenticated ApiClient (in-cluster service account or
kubeconfig), without the typed models. KINDS is the one table of those
resources; rbac.py derives the operator's RBAC rules from it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import kubernetes

from model_operator import crd


def api_group(api_version: str) -> str:
    """The group part of an apiVersion: "apps/v1" -> "apps", the core group's "v1" -> "" (RBAC spells it so)."""
    return api_version.rpartition("/")[0]


@dataclass(frozen=True)
class Kind:
    api_version: str
    plural: str
    namespaced: bool = True

    @property
    def group(self) -> str:
        return api_group(self.api_version)

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]

    def path(self, namespace: str | None = None, name: str | None = None, subresource: str | None = None) -> str:
        prefix = "/api/" if self.api_version == "v1" else "/apis/"
        path = prefix + self.api_version
        if self.namespaced and namespace:
            path += f"/namespaces/{namespace}"
        path += f"/{self.plural}"
        for part in (name, subresource):
            if part:
                path += f"/{part}"
        return path


KINDS: dict[str, Kind] = {
    crd.KIND: Kind(crd.API_VERSION, crd.PLURAL),
    "PersistentVolumeClaim": Kind("v1", "persistentvolumeclaims"),
    "Service": Kind("v1", "services"),
    "Secret": Kind("v1", "secrets"),
    "Job": Kind("batch/v1", "jobs"),
    "Deployment": Kind("apps/v1", "deployments"),
    "PodDisruptionBudget": Kind("policy/v1", "poddisruptionbudgets"),
    "HorizontalPodAutoscaler": Kind("autoscaling/v2", "horizontalpodautoscalers"),
    "ScaledObject": Kind("keda.sh/v1alpha1", "scaledobjects"),
    "InterceptorRoute": Kind("http.keda.sh/v1beta1", "interceptorroutes"),
    "InferencePool": Kind("inference.networking.k8s.io/v1", "inferencepools"),
    "HTTPRoute": Kind("gateway.networking.k8s.io/v1", "httproutes"),
    "StorageClass": Kind("storage.k8s.io/v1", "storageclasses", namespaced=False),
}
# The kinds a ModelDeployment owns (the rest of KINDS are only read): watched, and granted full verbs.
CHILD_KINDS = tuple(name for name in KINDS if name not in {crd.KIND, "Secret", "StorageClass"})
# Children whose API comes from an add-on the cluster may lack, with what to install for them.
ADD_ON_KINDS = {
    "ScaledObject": "KEDA",
    "InterceptorRoute": "the KEDA HTTP add-on",
    "HorizontalPodAutoscaler": "the autoscaling/v2 API",
    "InferencePool": "the Gateway API Inference Extension",
    "HTTPRoute": "the Gateway API",
}


class ApiError(Exception):
    """A non-2xx answer; `reason` is the Status reason (NotFound, AlreadyExists, Invalid, ...)."""

    def __init__(self, status: int, reason: str, message: str):
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message


class NotFound(ApiError):
    pass


class AlreadyExists(ApiError):
    """409 on create: another reconcile (or a previous run) got there first."""


def configure() -> None:
    """Load credentials the way kubectl does: in-cluster service account first, then kubeconfig."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        # KUBECONFIG is read now, not at import time as the library's default does.
        kubernetes.config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))


class Client:
    def __init__(self, api_client: kubernetes.client.ApiClient | None = None):
        self.api = api_client or kubernetes.client.ApiClient()

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                query: dict | None = None) -> dict:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        method, url, headers, body, _ = self.api.param_serialize(
            method, path, query_params=list((query or {}).items()), header_params=headers, body=body,
            auth_settings=["BearerToken"])
        response = self.api.call_api(method, url, headers, body, _request_timeout=30)
        data = response.read()
        payload = json.loads(data) if data else {}
        if response.status >= 400:
            reason = payload.get("reason") or str(response.reason)
            message = payload.get("message") or data.decode(errors="replace")[:500]
            error = {404: NotFound, 409: AlreadyExists}.get(response.status, ApiError)
            raise error(response.status, reason, message)
        return payload

    def get(self, kind: str, namespace: str | None, name: str) -> dict | None:
        try:
            return self.request("GET", KINDS[kind].path(namespace, name))
        except NotFound:
            return None

    def list(self, kind: str, namespace: str, label_selector: str) -> list[dict]:
        """Objects matching the selector; none when the resource is not installed (e.g. no KEDA)."""
        try:
            found = self.request("GET", KINDS[kind].path(namespace), query={"labelSelector": label_selector})
        except NotFound:
            return []
        return [item for item in found.get("items", []) if _matches(item, label_selector)]

    def create(self, obj: dict) -> dict:
        return self.request("POST", KINDS[obj["kind"]].path(obj["metadata"].get("namespace")), body=obj)

    def merge_patch(self, kind: str, namespace: str, name: str, patch: dict, subresource: str | None = None) -> dict:
        return self.request("PATCH", KINDS[kind].path(namespace, name, subresource), body=patch,
                            content_type="application/merge-patch+json")

    def delete(self, kind: str, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", KINDS[kind].path(namespace, name), body={"propagationPolicy": "Background"})
        except NotFound:
            pass


def _matches(obj: dict, label_selector: str) -> bool:
    """Equality selectors re-checked client-side: the API server filters, simple test servers may not."""
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(labels.get(key) == value for key, value in (term.split("=", 1) for term in label_selector.split(",")))
