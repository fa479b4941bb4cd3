"""The Helm chart, rendered by the real Helm engine (Helm v4 SDK through helm-python-sdk).

Every documented option is rendered, linted in strict mode, and every object it
produces is validated against the Kubernetes OpenAPI schemas of 1.29 to 1.37
(kubernetes-validate, strict) or, for custom resources, against their own schema.
"""

from __future__ import annotations

import copy
import functools
import json

import helm_python
import kubernetes_validate
import pytest
import yaml

import gen_rbac_rules
from helm_render import CHART_DIR, DEFAULT_NAMESPACE, ROOT, render_objects, render_templates
from model_operator import __main__ as operator_main
from model_operator import crd, resources, spec
from model_operator.rbac import RBAC_RULES
from operator_fixtures.schema import admission_errors
from operator_fixtures.third_party import validation_errors

KUBERNETES_VERSIONS = [f"1.{minor}" for minor in range(29, 38)]
PROMETHEUS_OPERATOR = ("monitoring.coreos.com/v1",)
EXAMPLE_SPECS = [document["spec"] for path in sorted((ROOT / "manifests" / "examples").glob("*.yaml"))
                 for document in yaml.safe_load_all(path.read_text()) if document["kind"] == crd.KIND]

# One entry per documented option (values.yaml), each rendered and validated.
OPTIONS = {
    "defaults": {},
    "watch-namespaces": {"watchNamespaces": ["team-a", "team-b"]},
    "own-images": {"image": {"repository": "registry.example.com:5000/ml/kubellm-operator", "tag": "1.2.3",
                             "pullPolicy": "Always"},
                   "engineImage": {"repository": "registry.example.com/ml/kubellm-engine", "tag": "1.2.3-cu13"},
                   "imagePullSecrets": [{"name": "regcred"}]},
    "existing-service-account": {"serviceAccount": {"create": False, "name": "operator-sa"}},
    "service-account-annotations": {"serviceAccount": {"annotations": {"example.com/role": "kubellm"}}},
    "no-rbac": {"rbac": {"create": False}},
    "debug-logs": {"logLevel": "DEBUG"},
    "health-endpoint": {"health": {"address": "::", "port": 9808}},
    "scheduling": {"nodeSelector": {"kubernetes.io/os": "linux"},
                   "tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
                   "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                       "nodeSelectorTerms": [{"matchExpressions": [
                           {"key": "node-role", "operator": "In", "values": ["system"]}]}]}}},
                   "priorityClassName": "system-cluster-critical",
                   "podAnnotations": {"example.com/team": "ml"}, "podLabels": {"team": "ml"},
                   "resources": {"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": 1,
                                                                                              "memory": "1Gi"}}},
    "pod-monitor-labels": {"monitoring": {"podMonitor": {"interval": "30s",
                                                         "labels": {"release": "kube-prometheus-stack"}}}},
    "pod-monitor-off": {"monitoring": {"podMonitor": {"enabled": False}}},
    "models-catalog": {"models": [{"name": f"model-{index}", "spec": model_spec}
                                  for index, model_spec in enumerate(EXAMPLE_SPECS)]},
}

BAD_VALUES = {
    "unknown-key": {"replicaCount": 2},
    "misspelled-nested-key": {"image": {"repo": "x"}},
    "pull-policy": {"image": {"pullPolicy": "Sometimes"}},
    "image-with-tag-in-repository": {"image": {"repository": "ghcr.io/kubellm/kubellm-operator:latest"}},
    "tag-with-space": {"engineImage": {"tag": "1.0 beta"}},
    "tag-as-number": {"image": {"tag": 1.0}},
    "empty-namespace": {"watchNamespaces": [""]},
    "namespace-not-dns": {"watchNamespaces": ["Team_A"]},
    "namespace-twice": {"watchNamespaces": ["a", "a"]},
    "namespaces-not-a-list": {"watchNamespaces": "team-a"},
    "service-account-name-not-dns": {"serviceAccount": {"name": "Operator SA"}},
    "rbac-create-string": {"rbac": {"create": "yes"}},
    "log-level": {"logLevel": "verbose"},
    "health-port": {"health": {"port": 70000}},
    "health-address": {"health": {"address": "0.0.0.0:8080/x"}},
    "resource-quantity": {"resources": {"requests": {"memory": "lots"}}},
    "resource-field": {"resources": {"request": {"memory": "1Gi"}}},
    "interval": {"monitoring": {"podMonitor": {"interval": "fast"}}},
    "model-without-spec": {"models": [{"name": "m"}]},
    "model-without-source": {"models": [{"name": "m", "spec": {"model": {}}}]},
    "model-name-not-dns": {"models": [{"name": "My Model", "spec": {"model": {"source": "hf://a/b"}}}]},
}


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def rendered(request) -> tuple[str, list[dict]]:
    """(option name, objects) with the Prometheus Operator present, so optional objects render too."""
    return request.param, render_objects(OPTIONS[request.param], api_versions=PROMETHEUS_OPERATOR)


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [document for document in objects if document["kind"] == kind]


def operator_container(objects: list[dict]) -> dict:
    (deployment,) = by_kind(objects, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, str]:
    return {variable["name"]: variable["value"] for variable in container["env"]}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_lint_strict_passes(option):
    report = helm_python.lint(CHART_DIR, OPTIONS[option], strict=True, namespace=DEFAULT_NAMESPACE)
    problems = [message for message in report["messages"] if message["severity"] >= 2]
    assert report["errors"] == [] and problems == []


def test_every_rendered_object_is_valid_for_every_kubernetes_version(rendered):
    option, objects = rendered
    for document in objects:
        if document["kind"] == crd.KIND:
            assert admission_errors(document) == [], (option, document["metadata"]["name"])
        elif document["kind"] == "PodMonitor":
            assert validation_errors(document) == [], option
        else:
            for version in KUBERNETES_VERSIONS:
                validate_once(json.dumps(document, sort_keys=True), version)


@functools.cache
def validate_once(document_json: str, version: str) -> None:
    """kubernetes-validate, strict; options that render the same object share one check."""
    kubernetes_validate.validate(json.loads(document_json), version, strict=True)


def test_every_object_is_namespaced_in_the_release_namespace_or_cluster_scoped(rendered):
    _, objects = rendered
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding"}
    for document in objects:
        namespace = document["metadata"].get("namespace")
        if document["kind"] in cluster_scoped:
            assert namespace is None
        elif document["kind"] not in {"Role", "RoleBinding"}:
            assert namespace == DEFAULT_NAMESPACE


@pytest.mark.parametrize("option", sorted(BAD_VALUES))
def test_schema_rejects_bad_values(option):
    with pytest.raises(helm_python.HelmValuesError):
        render_templates(BAD_VALUES[option])


def test_operator_pod_is_locked_down():
    objects = render_objects()
    pod = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]
    container = operator_container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert container["securityContext"] == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                            "capabilities": {"drop": ["ALL"]}}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert container["livenessProbe"]["httpGet"]["port"] in {port["name"] for port in container["ports"]}


@pytest.mark.parametrize("option", ["defaults", "debug-logs", "health-endpoint"])
def test_operator_reads_every_setting_the_chart_passes(option):
    container = operator_container(render_objects(OPTIONS[option]))
    environ = env_of(container)
    assert set(environ) == {operator_main.WATCH_NAMESPACES_ENV, spec.ENGINE_IMAGE_ENV, operator_main.LOG_LEVEL_ENV,
                            operator_main.HEALTH_ADDRESS_ENV, operator_main.HEALTH_PORT_ENV}
    settings = operator_main.parse_settings([], environ)  # what the operator makes of them
    assert settings.log_level == (OPTIONS[option].get("logLevel") or "INFO")
    (health,) = [port for port in container["ports"] if port["name"] == container["livenessProbe"]["httpGet"]["port"]]
    assert settings.health_port == health["containerPort"]
    assert settings.health_address == OPTIONS[option].get("health", {}).get("address", "0.0.0.0")
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_default_engine_image_is_the_operators_default():
    """The chart's appVersion tags the same engine image the operator falls back to."""
    assert env_of(operator_container(render_objects()))[spec.ENGINE_IMAGE_ENV] == spec.DEFAULT_ENGINE_IMAGE


def test_image_options_reach_the_operator():
    objects = render_objects(OPTIONS["own-images"])
    container = operator_container(objects)
    assert container["image"] == "registry.example.com:5000/ml/kubellm-operator:1.2.3"
    assert env_of(container)[spec.ENGINE_IMAGE_ENV] == "registry.example.com/ml/kubellm-engine:1.2.3-cu13"


def test_chart_version_follows_the_package_version():
    metadata = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    package_version = [line.split('"')[1] for line in (ROOT / "pyproject.toml").read_text().splitlines()
                       if line.startswith("version = ")][0]
    assert metadata["appVersion"] == package_version


def test_chart_ships_the_generated_crd():
    with helm_python.Chart.load(CHART_DIR) as chart:
        (shipped,) = chart.crds
    assert yaml.safe_load(shipped["data"]) == crd.crd()


def test_models_catalog_renders_model_deployments():
    values = OPTIONS["models-catalog"]
    rendered = by_kind(render_objects(values), crd.KIND)
    assert [(document["metadata"]["name"], document["spec"]) for document in rendered] == [
        (model["name"], model["spec"]) for model in values["models"]]


# --- PodMonitor ---------------------------------------------------------------------------------


def test_pod_monitor_check_is_strict():
    """The PodMonitor is checked against prometheus-operator's CRD; a misspelled field fails."""
    (monitor,) = by_kind(render_objects(api_versions=PROMETHEUS_OPERATOR), "PodMonitor")
    monitor["spec"]["podMetricsEndpoints"][0]["scrapeInterval"] = "15s"
    assert any("scrapeInterval" in error for error in validation_errors(monitor))


def engine_pod_template(namespace: str = "team-a") -> dict:
    body = {"metadata": {"name": "llama", "namespace": namespace, "uid": "u-1"},
            "spec": {"model": {"source": "hf://meta-llama/Llama-3.1-8B-Instruct"}}}
    target = resources.Target.from_body(body)
    return resources.engine_deployment(target, spec.DEFAULT_ENGINE_IMAGE)["spec"]["template"]


def selects(selector: dict, labels: dict) -> bool:
    expressions_hold = all(
        (expression["key"] in labels) == (expression["operator"] == "Exists")
        for expression in selector.get("matchExpressions", []))
    return expressions_hold and all(labels.get(key) == value for key, value in selector["matchLabels"].items())


def test_pod_monitor_renders_only_with_the_prometheus_operator():
    assert by_kind(render_objects(), "PodMonitor") == []
    assert len(by_kind(render_objects(api_versions=PROMETHEUS_OPERATOR), "PodMonitor")) == 1
    assert by_kind(render_objects(OPTIONS["pod-monitor-off"], api_versions=PROMETHEUS_OPERATOR),
                   "PodMonitor") == []


def test_pod_monitor_scrapes_the_engine_pods_the_operator_builds():
    (monitor,) = by_kind(render_objects(api_versions=PROMETHEUS_OPERATOR), "PodMonitor")
    template = engine_pod_template()
    (engine,) = template["spec"]["containers"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert selects(monitor["spec"]["selector"], template["metadata"]["labels"])
    assert endpoint["port"] in {port["name"] for port in engine["ports"]}
    assert endpoint["path"] == template["metadata"]["annotations"]["prometheus.io/path"]
    assert monitor["spec"]["namespaceSelector"] == {"any": True}


def test_pod_monitor_follows_watch_namespaces():
    objects = render_objects(OPTIONS["watch-namespaces"], api_versions=PROMETHEUS_OPERATOR)
    (monitor,) = by_kind(objects, "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["team-a", "team-b"]}


def test_pod_monitor_does_not_select_fetch_or_operator_pods():
    (monitor,) = by_kind(render_objects(api_versions=PROMETHEUS_OPERATOR), "PodMonitor")
    operator_pod = by_kind(render_objects(), "Deployment")[0]["spec"]["template"]
    labels = copy.deepcopy(engine_pod_template()["metadata"]["labels"])
    labels[resources.LABEL_COMPONENT] = resources.COMPONENT_FETCH
    assert not selects(monitor["spec"]["selector"], labels)
    assert not selects(monitor["spec"]["selector"], operator_pod["metadata"]["labels"])


def test_notes_tell_how_to_apply_a_first_model():
    notes = render_templates()["kubellm/templates/NOTES.txt"]
    manifest = notes.split("kubectl apply -f - <<'YAML'\n")[1].split("  YAML\n")[0]
    document = yaml.safe_load("\n".join(line.removeprefix("  ") for line in manifest.splitlines()))
    assert admission_errors(document) == []
    assert DEFAULT_NAMESPACE in notes and "/v1/chat/completions" in notes


# --- RBAC: exactly operator/rbac.py's RBAC_RULES ---------------------------------------------------


def canonical(rules: list[dict]) -> list[str]:
    """Rules as sorted JSON-ish strings, so order does not matter but every verb does."""
    return sorted(repr(sorted((key, sorted(value)) for key, value in rule.items())) for rule in rules)


def test_rbac_rules_file_is_generated_from_the_operator():
    assert gen_rbac_rules.RULES_FILE.read_text() == gen_rbac_rules.render(), (
        "regenerate with: python tools/gen_rbac_rules.py")


def test_cluster_wide_install_grants_exactly_the_operators_rules():
    objects = render_objects()
    (cluster_role,) = by_kind(objects, "ClusterRole")
    assert canonical(cluster_role["rules"]) == canonical(RBAC_RULES)
    assert by_kind(objects, "Role") == [] and by_kind(objects, "RoleBinding") == []


def test_watch_namespaces_binds_namespaced_rules_per_namespace():
    objects = render_objects(OPTIONS["watch-namespaces"])
    (cluster_role,) = by_kind(objects, "ClusterRole")
    roles = {role["metadata"]["namespace"]: role for role in by_kind(objects, "Role")}
    assert set(roles) == {"team-a", "team-b"}
    for role in roles.values():
        assert canonical(cluster_role["rules"] + role["rules"]) == canonical(RBAC_RULES)
        assert all(gen_rbac_rules.is_namespaced(rule) for rule in role["rules"])
    assert not any(gen_rbac_rules.is_namespaced(rule) for rule in cluster_role["rules"])
    assert env_of(operator_container(objects))["KUBELLM_WATCH_NAMESPACES"] == "team-a,team-b"


@pytest.mark.parametrize("option", ["defaults", "watch-namespaces", "existing-service-account"])
def test_bindings_name_the_operators_service_account(option):
    objects = render_objects(OPTIONS[option])
    account = by_kind(objects, "Deployment")[0]["spec"]["template"]["spec"]["serviceAccountName"]
    bindings = by_kind(objects, "ClusterRoleBinding") + by_kind(objects, "RoleBinding")
    assert bindings and all(binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": DEFAULT_NAMESPACE}] for binding in bindings)
    roles = {(role["kind"], role["metadata"]["name"], role["metadata"].get("namespace"))
             for role in by_kind(objects, "ClusterRole") + by_kind(objects, "Role")}
    for binding in bindings:
        assert (binding["roleRef"]["kind"], binding["roleRef"]["name"],
                binding["metadata"].get("namespace")) in roles


def test_rbac_create_false_renders_no_rbac():
    objects = render_objects(OPTIONS["no-rbac"])
    assert not [document for document in objects if document["apiVersion"].startswith("rbac.")]


def test_chart_declares_the_oldest_kubernetes_it_is_tested_on():
    """Helm refuses to install on a cluster older than Chart.yaml's kubeVersion (the offline render does not check)."""
    metadata = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert metadata["kubeVersion"] == f">={KUBERNETES_VERSIONS[0]}.0-0"
    for version in KUBERNETES_VERSIONS:
        assert render_objects(kube_version=f"v{version}.0") == render_objects()


def test_models_outside_the_watched_namespaces_are_refused():
    values = {"models": OPTIONS["models-catalog"]["models"][:1], "watchNamespaces": ["team-a"]}
    with pytest.raises(helm_python.HelmRenderError, match="watchNamespaces does not include"):
        render_objects(values)
    assert by_kind(render_objects(values | {"watchNamespaces": ["team-a", DEFAULT_NAMESPACE]}), crd.KIND)


def test_notes_report_which_add_ons_the_cluster_serves():
    """Every add-on API the operator may write to is looked up (the chart installs none of their CRDs)."""
    from model_operator.kube import ADD_ON_KINDS, KINDS

    add_on_apis = {KINDS[kind].api_version for kind in ADD_ON_KINDS if kind != "HorizontalPodAutoscaler"}
    notes_without = render_templates()["kubellm/templates/NOTES.txt"]
    assert notes_without.count(" missing  (") == len(add_on_apis) + 1  # and the Prometheus Operator
    served = tuple(sorted(add_on_apis)) + PROMETHEUS_OPERATOR
    notes_with = render_templates(api_versions=served)["kubellm/templates/NOTES.txt"]
    assert notes_with.count(" found    (") == len(served) and " missing " not in notes_with
    templates = (CHART_DIR / "templates" / "NOTES.txt").read_text()
    assert all(f'"{api}"' in templates for api in served)
