"""Every API permission the operator needs, in one list.

The Helm chart's ClusterRole and manifests/install.yaml render RBAC_RULES;
tests compare them, so a new API call here cannot ship without its permission.
StorageClasses, CRDs and Namespaces are cluster-scoped, so the rules belong in a
ClusterRole (bound cluster-wide, or per watched namespace plus the cluster-scoped part).
"""

from __future__ import annotations

from model_operator import crd
from model_operator.kube import CHILD_KINDS, KINDS, api_group

CHILD_VERBS = ["get", "list", "watch", "create", "patch", "delete"]


def _rule(api_version: str, resources: list[str], verbs: list[str]) -> dict:
    return {"apiGroups": [api_group(api_version)], "resources": resources, "verbs": verbs}


def _child_rules() -> list[dict]:
    """One rule per owned child kind."""
    return [_rule(KINDS[name].api_version, [KINDS[name].plural], CHILD_VERBS) for name in CHILD_KINDS]


RBAC_RULES: list[dict] = [
    # The custom resource: kopf watches it and keeps its progress in annotations; status is ours.
    _rule(crd.API_VERSION, [crd.PLURAL], ["get", "list", "watch", "patch", "update"]),
    _rule(crd.API_VERSION, [f"{crd.PLURAL}/status"], ["get", "patch", "update"]),
    # ownerReferences with blockOwnerDeletion need update on the owner's finalizers.
    _rule(crd.API_VERSION, [f"{crd.PLURAL}/finalizers"], ["update"]),
    *_child_rules(),
    # Preflight checks: referenced Secrets and StorageClasses must exist.
    _rule("v1", ["secrets"], ["get"]),
    _rule("storage.k8s.io/v1", ["storageclasses"], ["get"]),
    # Events on the ModelDeployment (kopf posts core/v1 Events).
    _rule("v1", ["events"], ["create", "patch"]),
    # kopf's resource discovery and namespace scanning.
    _rule("apiextensions.k8s.io/v1", ["customresourcedefinitions"], ["get", "list", "watch"]),
    _rule("v1", ["namespaces"], ["get", "list", "watch"]),
]
