"""Render the kubellm chart offline with the real Helm engine (helm-python-sdk, Helm v4 SDK).

Shared by tools/gen_install_manifest.py and the chart tests, so both see the
exact objects `helm install` would create.
"""

from __future__ import annotations

import json
import pathlib

import helm_python
import yaml
from helm_python import _native

ROOT = pathlib.Path(__file__).resolve().parent.parent
CHART_DIR = ROOT / "charts" / "kubellm"
DEFAULT_RELEASE = "kubellm"
DEFAULT_NAMESPACE = "kubellm-system"
# Helm's install order (pkg/release/util/kind_sorter.go) for the kinds this chart renders:
# what a Deployment's pods need exists before the Deployment.
INSTALL_ORDER = ("Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding",
                 "Deployment")


def render_templates(values: dict | None = None, *, release: str = DEFAULT_RELEASE,
                     namespace: str = DEFAULT_NAMESPACE, api_versions: tuple[str, ...] = (),
                     kube_version: str | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` produces it.

    `api_versions` and `kube_version` play the cluster's part in .Capabilities
    (e.g. "monitoring.coreos.com/v1" when the Prometheus Operator is installed).
    Chart.render() does not expose them, so this calls the same native entry
    point with the SDK's full option set.
    """
    options: dict = {"name": release, "namespace": namespace, "is_install": True}
    if api_versions:
        options["api_versions"] = list(api_versions)
    if kube_version:
        options["kube_version"] = kube_version
    with helm_python.Chart.load(CHART_DIR) as chart:  # rendering validates values.schema.json
        rendered = _native.call_string("helm_render", chart._raw(), json.dumps(values or {}),
                                       json.dumps(options))
    return json.loads(rendered)


def install_rank(document: dict) -> int:
    """Position of a kind in INSTALL_ORDER; other kinds (custom resources) come last."""
    kind = document["kind"]
    return INSTALL_ORDER.index(kind) if kind in INSTALL_ORDER else len(INSTALL_ORDER)


def render_objects(values: dict | None = None, **options) -> list[dict]:
    """Every Kubernetes object the chart renders (NOTES.txt excluded), in Helm's install order."""
    objects = []
    for path, text in sorted(render_templates(values, **options).items()):
        if path.endswith("NOTES.txt"):
            continue
        objects.extend(document for document in yaml.safe_load_all(text) if document)
    return sorted(objects, key=install_rank)
