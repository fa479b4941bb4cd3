"""PURE status computation: what the children report -> the ModelDeployment's status.

The phase walks Pending -> Downloading -> Loading -> Ready, or ends Degraded /
Failed; the conditions carry a reason and a message a user can act on.
"""

from __future__ import annotations

from dataclasses import dataclass

from model_operator import crd
from model_operator.resources import Target, selector_string

PENDING, DOWNLOADING, LOADING, READY, DEGRADED, FAILED = crd.PHASES


@dataclass(frozen=True)
class Observed:
    """What the reconcile saw: the download Job and engine Deployment (None when absent), and any problem."""

    job: dict | None
    deployment: dict | None
    failure: str | None = None  # a spec that cannot work, or a child the API server rejected
    autoscaling_problem: str | None = None  # an autoscaler child the cluster cannot take (add-on missing)
    routing_problem: str | None = None  # likewise for the InferencePool / HTTPRoute

    @property
    def deployment_status(self) -> dict:
        return (self.deployment or {}).get("status", {})

    @property
    def ready_replicas(self) -> int:
        return self.deployment_status.get("readyReplicas", 0)


def job_condition(job: dict, condition_type: str) -> dict | None:
    for condition in job.get("status", {}).get("conditions") or []:
        if condition.get("type") == condition_type and condition.get("status") == "True":
            return condition
    return None


def job_succeeded(job: dict | None) -> bool:
    return job is not None and (job.get("status", {}).get("succeeded", 0) >= 1 or bool(job_condition(job, "Complete")))


def model_cached(target: Target, job: dict | None) -> bool:
    """file:// models need no Job; the others are usable once their Job succeeded."""
    return target.source.scheme == "file" or job_succeeded(job)


def progress_deadline_exceeded(deployment: dict) -> str | None:
    for condition in deployment.get("status", {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            return condition.get("message", "")
    return None


def phase(target: Target, observed: Observed) -> tuple[str, str]:
    """The phase and a one-line message saying what is happening or what to fix."""
    if observed.failure:
        return FAILED, observed.failure
    job = observed.job
    if not model_cached(target, job):
        name = job["metadata"]["name"] if job else "(not created yet)"
        failed = job_condition(job, "Failed") if job else None
        if failed:
            return FAILED, (f"model download Job {name} failed ({failed.get('reason', 'Failed')}: "
                            f"{failed.get('message', '')}); see `kubectl logs job/{name}`, fix the cause, "
                            f"then `kubectl delete job {name}` to retry")
        if job and job.get("status", {}).get("active"):
            return DOWNLOADING, f"Job {name} is fetching {target.spec['model']['source']}"
        return PENDING, f"waiting for the model download Job {name} to start"
    deployment = observed.deployment
    if deployment is None:
        return PENDING, "creating the engine Deployment"
    wanted = target.spec["replicas"]
    ready = observed.ready_replicas
    stuck = progress_deadline_exceeded(deployment)
    if stuck is not None and ready == 0:
        return FAILED, f"engine pods never became ready: {stuck}; see `kubectl describe pods -l {selector_string(target)}`"
    if wanted == 0:
        return READY, "scaled to zero"
    if ready >= wanted:
        return READY, f"{ready}/{wanted} replicas ready"
    if ready == 0:
        return LOADING, f"engines are loading the model (0/{wanted} replicas ready)"
    return DEGRADED, f"{ready}/{wanted} replicas ready"


def condition(condition_type: str, ok: bool, reason: str, message: str) -> dict:
    return {"type": condition_type, "status": "True" if ok else "False", "reason": reason, "message": message}


def model_cached_condition(target: Target, observed: Observed) -> dict:
    if target.source.scheme == "file":
        return condition("ModelCached", True, "InImage", "the model folder is part of the engine container")
    if model_cached(target, observed.job):
        reason = "Verified" if target.source.scheme == "pvc" else "Downloaded"
        return condition("ModelCached", True, reason, f"{target.spec['model']['source']} is ready on the volume")
    if observed.job and job_condition(observed.job, "Failed"):
        return condition("ModelCached", False, "DownloadFailed", f"Job {observed.job['metadata']['name']} failed")
    return condition("ModelCached", False, "Downloading", "the download Job has not finished")


def autoscaling_condition(target: Target, observed: Observed) -> dict:
    autoscaling = target.spec["autoscaling"]
    if not autoscaling["enabled"]:
        return condition("Autoscaling", False, "Disabled", f"fixed at spec.replicas={target.spec['replicas']}")
    if observed.autoscaling_problem:
        return condition("Autoscaling", False, "AutoscalerUnavailable", observed.autoscaling_problem)
    aim = (f"{autoscaling['http']['targetConcurrentRequests']} in-flight requests"
           if autoscaling["mode"] == "keda-http" else f"{autoscaling['targetPendingRequests']} waiting requests")
    return condition("Autoscaling", True, autoscaling["mode"].upper().replace("-", ""),
                     f"{autoscaling['minReplicas']}-{autoscaling['maxReplicas']} replicas, aiming at {aim} per replica")


def routing_condition(target: Target, observed: Observed) -> dict:
    routing = target.spec["routing"]
    if not routing["inferencePool"]["enabled"]:
        return condition("Routing", False, "Disabled", "clients reach the replicas through the Service")
    if observed.routing_problem:
        return condition("Routing", False, "RoutingUnavailable", observed.routing_problem)
    picker = routing["inferencePool"]["endpointPicker"]["name"]
    attached = "an HTTPRoute attaches it to its Gateways" if "httpRoute" in routing else "attach it with an HTTPRoute"
    return condition("Routing", True, "InferencePool",
                     f"InferencePool {target.name} routes through endpoint picker {picker}; {attached}")


def conditions(target: Target, observed: Observed, current_phase: str, message: str) -> list[dict]:
    ready = observed.ready_replicas
    available = condition("Available", ready >= 1, "MinimumReplicasAvailable" if ready else "NoReadyReplicas",
                          f"{ready} engine replicas serve requests")
    if current_phase == READY:
        progressing = condition("Progressing", False, "Complete", message)
    elif current_phase == FAILED:
        progressing = condition("Progressing", False, "Failed", message)
    else:
        progressing = condition("Progressing", True, current_phase, message)
    return [model_cached_condition(target, observed), available, progressing, autoscaling_condition(target, observed),
            routing_condition(target, observed)]


def with_transition_times(new: list[dict], old: list[dict], now: str) -> list[dict]:
    """lastTransitionTime moves only when a condition's status changes."""
    previous = {item.get("type"): item for item in old or []}
    stamped = []
    for item in new:
        before = previous.get(item["type"])
        unchanged = before is not None and before.get("status") == item["status"] and "lastTransitionTime" in before
        stamped.append({**item, "lastTransitionTime": before["lastTransitionTime"] if unchanged else now})
    return stamped


def compute(target: Target, observed: Observed, generation: int | None, old_status: dict, now: str) -> dict:
    current_phase, message = phase(target, observed)
    status = {
        "phase": current_phase,
        "message": message,
        "replicas": observed.deployment_status.get("replicas", 0),
        "readyReplicas": observed.ready_replicas,
        "selector": selector_string(target),
        "endpoint": target.endpoint,
        "conditions": with_transition_times(conditions(target, observed, current_phase, message),
                                            old_status.get("conditions", []), now),
    }
    if generation is not None:
        status["observedGeneration"] = generation
    return status
