"""The operator: the real kopf handlers against kmock's Kubernetes emulator, and its pure parts.

The emulator tests play the cluster's controllers: they mark the download Job
active or complete and the Deployment's pods ready, delete a child, edit the
spec, and check what the operator did in return.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import kmock
import pytest
import pytest_asyncio

from model_operator import __main__ as entry_point, crd, handlers, resources, status as statuses
from model_operator.kube import KINDS
from model_operator.rbac import RBAC_RULES
from model_operator.handlers import WATCHED_CHILD_KINDS
from model_operator.reconcile import differs, merge_patch
from operator_fixtures.schema import schema_errors
from operator_fixtures.harness import (NAMESPACE, declare_resources, eventually, operator_thread, stored,
                                       write_kubeconfig)

pytestmark = pytest.mark.timeout(120)

NAME = "qwen"
SPEC = {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "servedName": "qwen-small"},
        "engine": {"image": "ghcr.io/kubellm/kubellm-engine:test"}}
MD_RESOURCE = kmock.resource(crd.GROUP, crd.VERSION, crd.PLURAL)


@pytest_asyncio.fixture()
async def cluster(kmock, tmp_path, monkeypatch):
    """The emulator with kubellm's resources declared and a kubeconfig pointing at it."""
    declare_resources(kmock)
    kubeconfig = tmp_path / "kubeconfig"
    write_kubeconfig(kubeconfig, str(kmock.url))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return kmock


async def api(cluster, method: str, kind: str, name: str | None = None, body: dict | None = None,
              subresource: str | None = None) -> dict:
    """Talk to the emulator as kubectl or a controller would."""
    path = KINDS[kind].path(NAMESPACE, name, subresource)
    async with cluster.request(method, path, json=body) as response:
        payload = await response.json()
        assert response.status < 400, payload
        return payload


async def watching_model_deployments(cluster) -> None:
    await eventually(lambda: len(cluster[kmock.action.WATCH, MD_RESOURCE]) > 0, "kopf's watch")


async def create_model_deployment(cluster, spec: dict = SPEC, name: str = NAME) -> None:
    await watching_model_deployments(cluster)
    await api(cluster, "POST", crd.KIND, body={
        "apiVersion": crd.API_VERSION, "kind": crd.KIND,
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}", "generation": 1},
        "spec": spec})


def md_status(cluster, name: str = NAME) -> dict:
    return (stored(cluster, crd.KIND, name) or {}).get("status", {})


async def phase_becomes(cluster, phase: str, name: str = NAME) -> dict:
    await eventually(lambda: md_status(cluster, name).get("phase") == phase, f"phase {phase}")
    return md_status(cluster, name)


def events(cluster, reason: str | None = None) -> list[dict]:
    posted = [request.data for request in cluster[kmock.method.POST, kmock.resource("", "v1", "events")]]
    return [event for event in posted if reason is None or event.get("reason") == reason]


def job_name(spec: dict = SPEC) -> str:
    return resources.fetch_job(target_for(spec), spec["engine"]["image"])["metadata"]["name"]


async def finish_download(cluster) -> None:
    await eventually(lambda: stored(cluster, "Job", job_name()), "the download Job")
    await api(cluster, "PATCH", "Job", job_name(), {"status": {"active": 1}}, "status")
    await phase_becomes(cluster, "Downloading")
    await api(cluster, "PATCH", "Job", job_name(), {"status": {
        "active": 0, "succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}}, "status")


async def deployment_after_download(cluster) -> dict:
    await create_model_deployment(cluster)
    await finish_download(cluster)
    return await eventually(lambda: stored(cluster, "Deployment", NAME), "the engine Deployment")


@pytest.mark.asyncio
async def test_create_builds_children_and_follows_job_and_deployment_status(cluster):
    async with operator_thread():
        await create_model_deployment(cluster)
        status = await phase_becomes(cluster, "Pending")
        assert status["endpoint"] == f"http://{NAME}.{NAMESPACE}.svc:8000/v1"
        for kind, name in (("PersistentVolumeClaim", f"{NAME}-model-cache"), ("Job", job_name()),
                           ("Service", NAME)):
            child = await eventually(lambda: stored(cluster, kind, name), f"{kind} {name}")
            assert child["metadata"]["ownerReferences"][0]["uid"] == f"uid-{NAME}"
        assert stored(cluster, "Deployment", NAME) is None, "engines must wait for the model"
        # No finalizer: deleting the ModelDeployment is left to owner-reference garbage collection.
        assert not stored(cluster, crd.KIND, NAME)["metadata"].get("finalizers")

        await finish_download(cluster)
        deployment = await eventually(lambda: stored(cluster, "Deployment", NAME), "the engine Deployment")
        assert deployment["metadata"]["ownerReferences"][0]["kind"] == crd.KIND
        status = await phase_becomes(cluster, "Loading")
        assert {c["type"]: c["status"] for c in status["conditions"]} == {
            "ModelCached": "True", "Available": "False", "Progressing": "True", "Autoscaling": "False",
            "Routing": "False"}

        await api(cluster, "PATCH", "Deployment", NAME, {"status": {"replicas": 1, "readyReplicas": 1,
                                                                    "updatedReplicas": 1}}, "status")
        status = await phase_becomes(cluster, "Ready")
        assert (status["replicas"], status["readyReplicas"], status["observedGeneration"]) == (1, 1, 1)
        assert status["selector"] == resources.selector_string(target_for(SPEC))
        await eventually(lambda: events(cluster, "Ready"), "a Ready event")
        assert events(cluster, "Downloading") and events(cluster, "Loading")


@pytest.mark.asyncio
async def test_spec_edit_patches_deployment_and_deleted_service_comes_back(cluster):
    async with operator_thread():
        await deployment_after_download(cluster)

        await api(cluster, "PATCH", crd.KIND, NAME, {"metadata": {"generation": 2},
                                                     "spec": {"engine": {"maxNumSeqs": 32, "dtype": "float16"}}})

        def engine_args():
            deployment = stored(cluster, "Deployment", NAME)
            return deployment["spec"]["template"]["spec"]["containers"][0]["args"]

        await eventually(lambda: "32" in engine_args() and "float16" in engine_args(), "the patched Deployment")
        await eventually(lambda: md_status(cluster).get("observedGeneration") == 2, "observedGeneration 2")

        await api(cluster, "DELETE", "Service", NAME)
        service = await eventually(lambda: stored(cluster, "Service", NAME), "the Service to come back")
        assert service["spec"]["ports"][0]["name"] == "http"

        await api(cluster, "PATCH", "Deployment", NAME, {"spec": {"replicas": 5}})
        await eventually(lambda: stored(cluster, "Deployment", NAME)["spec"]["replicas"] == 1, "drift repaired")


@pytest.mark.asyncio
async def test_missing_secret_fails_with_a_message_and_an_event_then_recovers(cluster, monkeypatch):
    monkeypatch.setattr(handlers, "RETRY_BASE_SECONDS", 0.2)
    spec = {**SPEC, "model": {**SPEC["model"], "hfTokenSecret": {"name": "hf-token"}}}
    async with operator_thread():
        await create_model_deployment(cluster, spec)
        status = await phase_becomes(cluster, "Failed")
        assert "Secret hf-token does not exist" in status["message"]
        assert "kubectl create secret generic hf-token" in status["message"]
        warnings = await eventually(lambda: events(cluster, "Failed"), "a Failed event")
        assert warnings[0]["type"] == "Warning" and "hf-token" in warnings[0]["message"]
        assert stored(cluster, "Job", job_name(spec)) is None and stored(cluster, "Service", NAME) is None

        await api(cluster, "POST", "Secret", body={"apiVersion": "v1", "kind": "Secret", "data": {"token": "aGY="},
                                                   "metadata": {"name": "hf-token", "namespace": NAMESPACE}})
        await phase_becomes(cluster, "Pending")  # the retry found the Secret
        job = await eventually(lambda: stored(cluster, "Job", job_name(spec)), "the Job")
        assert job["spec"]["template"]["spec"]["containers"][0]["env"][-1]["valueFrom"]["secretKeyRef"] == {
            "name": "hf-token", "key": "token"}


@pytest.mark.asyncio
async def test_unknown_storage_class_fails_with_what_to_fix(cluster):
    async with operator_thread():
        await create_model_deployment(cluster, {**SPEC, "cache": {"storageClassName": "ultra-ssd"}})
        status = await phase_becomes(cluster, "Failed")
        assert "StorageClass ultra-ssd does not exist" in status["message"]
        assert "kubectl get storageclass" in status["message"]
        assert stored(cluster, "PersistentVolumeClaim", f"{NAME}-model-cache") is None


@pytest.mark.asyncio
async def test_failed_download_job_fails_the_model_deployment(cluster):
    async with operator_thread():
        await create_model_deployment(cluster)
        await eventually(lambda: stored(cluster, "Job", job_name()), "the Job")
        await api(cluster, "PATCH", "Job", job_name(), {"status": {"failed": 5, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "too many retries"}]}},
            "status")
        status = await phase_becomes(cluster, "Failed")
        assert "BackoffLimitExceeded" in status["message"] and f"kubectl logs job/{job_name()}" in status["message"]


@pytest.mark.asyncio
async def test_restart_changes_nothing(cluster):
    async with operator_thread():
        await deployment_after_download(cluster)
        await api(cluster, "PATCH", "Deployment", NAME, {"status": {"replicas": 1, "readyReplicas": 1}}, "status")
        await phase_becomes(cluster, "Ready")
        await asyncio.sleep(0.5)  # let the last child events settle
    before = len(list(cluster))
    status_before = md_status(cluster)
    async with operator_thread():
        def passes_after_restart() -> int:  # each reconcile pass reads the Deployment once
            deployment_path = KINDS["Deployment"].path(NAMESPACE, NAME)
            return sum(1 for r in list(cluster)[before:] if r.method == "GET" and r.url.path == deployment_path)

        await eventually(lambda: passes_after_restart() >= 2, "the resume handler and replayed child events")
        await asyncio.sleep(0.5)  # and whatever they would write next
    writes = [request for request in list(cluster)[before:]
              if request.method in ("POST", "PATCH", "PUT", "DELETE")
              and request.resource != kmock.resource("", "v1", "events")
              and not (request.resource == MD_RESOURCE and not request.subresource)]  # kopf's own annotations
    assert writes == [], [(r.method, str(r.url)) for r in writes]
    assert md_status(cluster) == status_before


@pytest.mark.asyncio
async def test_autoscaling_children_follow_the_spec(cluster):
    autoscaled = {**SPEC, "replicas": 2, "autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 4}}
    async with operator_thread():
        await create_model_deployment(cluster, autoscaled)
        scaled = await eventually(lambda: stored(cluster, "ScaledObject", NAME), "the ScaledObject")
        assert scaled["spec"]["scaleTargetRef"]["kind"] == crd.KIND
        await eventually(lambda: stored(cluster, "PodDisruptionBudget", NAME), "the PodDisruptionBudget")
        status = await eventually(lambda: md_status(cluster).get("conditions"), "conditions")
        assert {c["type"]: c["reason"] for c in status}["Autoscaling"] == "KEDA"

        await api(cluster, "PATCH", crd.KIND, NAME, {"spec": {"replicas": 1, "autoscaling": {"enabled": False}}})
        await eventually(lambda: stored(cluster, "ScaledObject", NAME) is None, "the ScaledObject to be pruned")
        await eventually(lambda: stored(cluster, "PodDisruptionBudget", NAME) is None, "the PDB to be pruned")
        assert events(cluster, "Deleted")


@pytest.mark.asyncio
async def test_scale_from_zero_and_routing_children_follow_the_spec(cluster):
    """keda-http: InterceptorRoute + ScaledObject; then routing: InferencePool + HTTPRoute; each pruned when dropped."""
    from_zero = {**SPEC, "autoscaling": {"enabled": True, "mode": "keda-http", "minReplicas": 0, "maxReplicas": 2}}
    async with operator_thread():
        await create_model_deployment(cluster, from_zero)
        route = await eventually(lambda: stored(cluster, "InterceptorRoute", NAME), "the InterceptorRoute")
        scaled = await eventually(lambda: stored(cluster, "ScaledObject", NAME), "the ScaledObject")
        assert route["spec"]["target"]["service"] == NAME
        assert scaled["spec"]["triggers"][0]["metadata"]["interceptorRoute"] == NAME
        assert route["metadata"]["ownerReferences"][0]["uid"] == f"uid-{NAME}"
        conditions = await eventually(lambda: md_status(cluster).get("conditions"), "conditions")
        assert {c["type"]: c["reason"] for c in conditions}["Autoscaling"] == "KEDAHTTP"

        routed = {"autoscaling": {"mode": "keda", "minReplicas": 1},
                  "routing": {"inferencePool": {"enabled": True, "endpointPicker": {"name": "qwen-epp"}},
                              "httpRoute": {"parentRefs": [{"name": "gw"}]}}}
        await api(cluster, "PATCH", crd.KIND, NAME, {"spec": routed})
        pool = await eventually(lambda: stored(cluster, "InferencePool", NAME), "the InferencePool")
        http_route = await eventually(lambda: stored(cluster, "HTTPRoute", NAME), "the HTTPRoute")
        assert pool["spec"]["endpointPickerRef"]["name"] == "qwen-epp"
        assert http_route["spec"]["rules"][0]["backendRefs"][0]["name"] == NAME
        await eventually(lambda: stored(cluster, "InterceptorRoute", NAME) is None, "the InterceptorRoute pruned")
        await eventually(lambda: stored(cluster, "ScaledObject", NAME)["spec"]["triggers"][0]["type"] == "prometheus",
                         "the ScaledObject patched to the Prometheus trigger")
        conditions = await eventually(
            lambda: {c["type"]: c for c in md_status(cluster).get("conditions", [])}.get("Routing", {}).get(
                "status") == "True" and md_status(cluster)["conditions"], "Routing condition")
        assert "qwen-epp" in {c["type"]: c for c in conditions}["Routing"]["message"]

        await api(cluster, "PATCH", crd.KIND, NAME, {"spec": {"routing": {
            "inferencePool": {"enabled": False, "endpointPicker": None}, "httpRoute": None}}})
        await eventually(lambda: stored(cluster, "HTTPRoute", NAME) is None, "the HTTPRoute pruned")
        await eventually(lambda: stored(cluster, "InferencePool", NAME) is None, "the InferencePool pruned")


@pytest.mark.asyncio
async def test_a_missing_add_on_is_reported_not_fatal(cluster):
    """Without the Inference Extension's CRDs the engines still serve; the Routing condition says what to install."""
    # Not discovered (kopf does not watch it), and a create answers 404 as a server without the CRD does.
    del cluster.resources[f"{KINDS['InferencePool'].api_version}/{KINDS['InferencePool'].plural}"]
    cluster[kmock.method.POST, kmock.resource("inference.networking.k8s.io", "v1", "inferencepools")] << 404
    pooled = {**SPEC, "routing": {"inferencePool": {"enabled": True, "endpointPicker": {"name": "qwen-epp"}}}}
    async with operator_thread():
        await create_model_deployment(cluster, pooled)
        await eventually(lambda: stored(cluster, "Service", NAME), "the Service")
        routing = await eventually(lambda: {c["type"]: c for c in md_status(cluster).get("conditions", [])}.get(
            "Routing"), "the Routing condition")
        assert routing["status"] == "False" and "Gateway API Inference Extension" in routing["message"]
        assert events(cluster, "RoutingUnavailable")


# --- the pure parts ---------------------------------------------------------------------------------------------------


def target_for(spec: dict) -> resources.Target:
    return resources.Target.from_body({"metadata": {"name": NAME, "namespace": NAMESPACE, "uid": "u"}, "spec": spec})


DONE_JOB = {"metadata": {"name": "j"}, "status": {"succeeded": 1}}


def deployment_with(**status) -> dict:
    return {"metadata": {"name": NAME}, "status": status}


@pytest.mark.parametrize("replicas,deployment_status,expected", [
    (2, {"readyReplicas": 2}, "Ready"),
    (2, {"readyReplicas": 1}, "Degraded"),
    (2, {}, "Loading"),
    (0, {}, "Ready"),
    (1, {"conditions": [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                         "message": "timed out"}]}, "Failed"),
])
def test_phase_follows_the_deployment(replicas, deployment_status, expected):
    observed = statuses.Observed(DONE_JOB, deployment_with(**deployment_status))
    assert statuses.phase(target_for({**SPEC, "replicas": replicas}), observed)[0] == expected


def test_computed_status_matches_the_crd_status_schema():
    target = target_for({**SPEC, "autoscaling": {"enabled": True}})
    computed = statuses.compute(target, statuses.Observed(DONE_JOB, deployment_with(replicas=1, readyReplicas=1)),
                                3, {}, "2026-11-22T00:00:00Z")
    assert [c["type"] for c in computed["conditions"]] == crd.CONDITION_TYPES
    document = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": NAME}, "spec": SPEC,
                "status": computed}
    assert schema_errors(document) == []


def test_file_sources_need_no_download():
    target = target_for({"model": {"source": "file:///models/qwen"}})
    assert statuses.phase(target, statuses.Observed(None, None)) == ("Pending", "creating the engine Deployment")
    cached = statuses.model_cached_condition(target, statuses.Observed(None, None))
    assert (cached["status"], cached["reason"]) == ("True", "InImage")


def test_condition_times_move_only_on_status_changes():
    old = [{"type": "Available", "status": "False", "lastTransitionTime": "T0"},
           {"type": "ModelCached", "status": "False", "lastTransitionTime": "T0"}]
    new = [{"type": "Available", "status": "False"}, {"type": "ModelCached", "status": "True"},
           {"type": "Progressing", "status": "True"}]
    stamped = statuses.with_transition_times(new, old, "T1")
    assert [c["lastTransitionTime"] for c in stamped] == ["T0", "T1", "T1"]


@pytest.mark.parametrize("desired,actual,drifted", [
    ({"a": 1}, {"a": 1, "serverDefault": "x"}, False),
    ({"cpu": "0.5"}, {"cpu": "500m"}, False),
    ({"gpus": 1}, {"gpus": "1"}, False),
    ({"memory": "1Gi"}, {"memory": "1G"}, True),
    ({"args": ["a", "b"]}, {"args": ["a"]}, True),
    ({"image": "x:1"}, {"image": "x:2"}, True),
    ({"spec": {"port": 8000}}, {}, True),
    ({"readOnly": True}, {"readOnly": "True"}, True),
    ({"replicas": 1}, {"replicas": True}, True),
])
def test_drift_detection(desired, actual, drifted):
    assert differs(desired, actual) is drifted


def test_switching_to_recreate_drops_the_rolling_update_settings():
    current = {"kind": "Deployment", "spec": {"replicas": 1, "strategy": {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}}}
    desired = {"kind": "Deployment", "spec": {"strategy": {"type": "Recreate"}}}
    assert merge_patch(desired, current) == {"kind": "Deployment", "spec": {"strategy": {
        "type": "Recreate", "rollingUpdate": None}}}
    assert merge_patch(current, desired) == current


def test_rbac_covers_every_resource_the_operator_touches():
    granted = {(group, resource): set(rule["verbs"])
               for rule in RBAC_RULES for group in rule["apiGroups"] for resource in rule["resources"]}
    for name, kind in KINDS.items():
        assert "get" in granted[(kind.group, kind.plural)], name
    for name in WATCHED_CHILD_KINDS:
        assert {"get", "list", "watch", "create", "patch", "delete"} <= granted[(KINDS[name].group, KINDS[name].plural)]
    assert "patch" in granted[(crd.GROUP, f"{crd.PLURAL}/status")]
    assert "create" in granted[("", "events")]


def test_watched_namespaces_from_the_environment():
    assert entry_point.watched_namespaces(" team-a, team-b ,") == ["team-a", "team-b"]
    assert entry_point.watched_namespaces("") == [] and entry_point.watched_namespaces(None) == []


@pytest.mark.asyncio
async def test_entry_point_serves_liveness_and_stops_on_sigterm(cluster, tmp_path, unused_tcp_port):
    """`python -m model_operator`, configured from the environment as the chart configures it, and a flag."""
    env = {**os.environ, "KUBELLM_HEALTH_PORT": str(unused_tcp_port), "KUBELLM_LOG_LEVEL": "WARNING"}
    env.pop(entry_point.WATCH_NAMESPACES_ENV, None)  # all namespaces (kmock cannot list namespaces)
    # Not from the repo root: its operator/ folder would shadow the standard library's `operator`.
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "model_operator",
                                                   "--health-address", "127.0.0.1", cwd=tmp_path, env=env,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        async def healthy() -> bool:
            try:
                async with aiohttp.ClientSession() as session:
                    async with session.get(f"http://127.0.0.1:{unused_tcp_port}/healthz") as response:
                        return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        deadline = asyncio.get_running_loop().time() + 30
        while not await healthy():
            assert process.returncode is None, (await process.stderr.read()).decode()
            assert asyncio.get_running_loop().time() < deadline, "no liveness endpoint"
            await asyncio.sleep(0.2)
        await watching_model_deployments(cluster)
    finally:
        process.send_signal(signal.SIGTERM)
        stderr = (await asyncio.wait_for(process.communicate(), 30))[1].decode()
    assert process.returncode == 0, stderr
