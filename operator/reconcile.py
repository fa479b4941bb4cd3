"""One reconcile pass: make a ModelDeployment's children match its spec, then report status.

Idempotent by construction: children are created when missing, patched only when
they differ from what the builders want, and removed only when the spec no
longer asks for them; the status is written only when it changed. Running it
twice in a row therefore sends no writes the second time, which is what makes
resume-after-restart and drift repair (a deleted or edited child) the same code.
"""

from __future__ import annotations

import copy
import datetime
import threading
from collections.abc import Callable
from decimal import Decimal

from kubernetes.utils import parse_quantity

from model_operator import crd, resources, status as statuses
from model_operator.kube import ADD_ON_KINDS, AlreadyExists, ApiError, Client
from model_operator.resources import Target

# Jobs' templates and PVCs' specs are (nearly) immutable: created once, never patched.
CREATE_ONLY_KINDS = {"Job", "PersistentVolumeClaim"}
# Children the spec can stop asking for; the cache PVC is never deleted automatically (it holds data).
PRUNABLE_KINDS = ("Job", "InterceptorRoute", "ScaledObject", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                  "InferencePool", "HTTPRoute")
AUTOSCALER_KINDS = {"InterceptorRoute", "ScaledObject", "HorizontalPodAutoscaler"}
UNAVAILABLE_REASONS = {"autoscaling": "AutoscalerUnavailable", "routing": "RoutingUnavailable"}  # Event reasons
# Objects inside a child that the builders own entirely (merge patches would otherwise keep stale keys).
REPLACED_WHOLE = {"Deployment": (("spec", "strategy"),)}

EventPoster = Callable[[dict, str, str, str], None]  # (ModelDeployment body, type, reason, message)


class SpecError(Exception):
    """The spec passed the schema but cannot work here; the message says what to fix."""


def same_value(desired: object, actual: object) -> bool:
    """Equal, or the same Kubernetes quantity spelled differently ("1" vs 1, "0.5" vs "500m")."""
    if isinstance(desired, bool) or isinstance(actual, bool):
        return desired is actual
    if desired == actual:
        return True
    if isinstance(desired, (str, int)) and isinstance(actual, (str, int)):
        try:
            return Decimal(parse_quantity(desired)) == Decimal(parse_quantity(actual))
        except ValueError:
            return False
    return False


def differs(desired: object, actual: object) -> bool:
    """True when `actual` lacks something `desired` sets; fields the API server adds are ignored."""
    if isinstance(desired, dict):
        return not isinstance(actual, dict) or any(differs(value, actual.get(key)) for key, value in desired.items())
    if isinstance(desired, list):
        return (not isinstance(actual, list) or len(desired) != len(actual)
                or any(differs(d, a) for d, a in zip(desired, actual)))
    return not same_value(desired, actual)


def merge_patch(desired: dict, current: dict) -> dict:
    """A JSON merge patch to `desired`; fields that must be replaced whole get their stale keys nulled.

    A merge patch merges objects, so switching a Deployment to Recreate would keep the old
    strategy.rollingUpdate, which the API server rejects.
    """
    patch = copy.deepcopy(desired)
    for path in REPLACED_WHOLE.get(desired["kind"], ()):
        wanted, existing = patch, current
        for key in path:
            wanted, existing = wanted.get(key, {}), (existing or {}).get(key) or {}
        for stale in set(existing) - set(wanted):
            wanted[stale] = None
    return patch


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Reconciler:
    def __init__(self, client: Client, default_image: str, post_event: EventPoster):
        self.client = client
        self.default_image = default_image
        self.post_event = post_event
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())

    def reconcile(self, namespace: str, name: str) -> dict | None:
        """Apply the spec, write the status and return it (None once the object is gone or going).

        Raises SpecError/ApiError after recording them on the status and in an Event.
        """
        with self._lock(namespace, name):
            # Read under the lock: an event's copy may predate the previous pass's status write.
            body = self.client.get(crd.KIND, namespace, name)
            if body is None or body["metadata"].get("deletionTimestamp"):
                return None  # garbage collection takes the children with it
            target = Target.from_body(body)
            try:
                self.check_references(target)
                observed = self.apply(body, target)
            except (SpecError, ApiError) as error:
                self.write_status(body, target, statuses.Observed(None, None, failure=str(error)))
                raise
            return self.write_status(body, target, observed)

    # --- preflight -----------------------------------------------------------------------

    def check_references(self, target: Target) -> None:
        """Objects the spec names must exist, or pods would hang in ContainerCreating / Pending."""
        model, engine, cache = target.spec["model"], target.spec["engine"], target.spec["cache"]
        for field, ref in (("model.hfTokenSecret", model.get("hfTokenSecret")),
                           ("engine.apiKeySecret", engine.get("apiKeySecret"))):
            if ref:
                self.check_secret(target, field, ref)
        claim = resources.cache_claim_name(target)
        if claim and (target.source.scheme == "pvc" or cache.get("existingClaim")):
            if self.client.get("PersistentVolumeClaim", target.namespace, claim) is None:
                raise SpecError(f"PersistentVolumeClaim {claim} (from the model source or cache.existingClaim) "
                                f"does not exist in namespace {target.namespace}")
        if resources.cache_pvc(target) and cache.get("storageClassName"):
            if self.client.get("StorageClass", None, cache["storageClassName"]) is None:
                raise SpecError(f"StorageClass {cache['storageClassName']} does not exist; set cache.storageClassName "
                                f"to one listed by `kubectl get storageclass`, or remove it to use the default")

    def check_secret(self, target: Target, field: str, ref: dict) -> None:
        secret = self.client.get("Secret", target.namespace, ref["name"])
        if secret is None:
            raise SpecError(f"{field}: Secret {ref['name']} does not exist in namespace {target.namespace}; create it "
                            f"with `kubectl create secret generic {ref['name']} --from-literal={ref['key']}=...`")
        if ref["key"] not in {**(secret.get("data") or {}), **(secret.get("stringData") or {})}:
            raise SpecError(f"{field}: Secret {ref['name']} has no key {ref['key']}")

    # --- children ------------------------------------------------------------------------

    def apply(self, body: dict, target: Target) -> statuses.Observed:
        desired = resources.children(target, self.default_image)
        job, deployment, problems = None, None, {"autoscaling": None, "routing": None}
        for child in desired:  # in dependency order: the cache volume, its Job, then the engines
            if child["kind"] == "Deployment" and not statuses.model_cached(target, job):
                # The engines keep serving the previous revision until the new one is on the volume.
                deployment = self.client.get("Deployment", target.namespace, target.name)
                continue
            try:
                current = self.ensure(body, child)
            except ApiError as error:
                if child["kind"] not in ADD_ON_KINDS or error.status != 404:
                    raise
                # The engines serve through their Service regardless; the condition says what is missing.
                area = "autoscaling" if child["kind"] in AUTOSCALER_KINDS else "routing"
                problems[area] = (f"cannot create the {child['kind']} ({error.message}); "
                                  f"is {ADD_ON_KINDS[child['kind']]} installed?")
                self.post_event(body, "Warning", UNAVAILABLE_REASONS[area], problems[area])
                continue
            if child["kind"] == "Job":
                job = current
            elif child["kind"] == "Deployment":
                deployment = current
        self.prune(body, target, desired)
        return statuses.Observed(job, deployment, autoscaling_problem=problems["autoscaling"],
                                 routing_problem=problems["routing"])

    def ensure(self, body: dict, child: dict) -> dict:
        """Create the child, or patch it back to the desired state; returns what the server holds."""
        kind, meta = child["kind"], child["metadata"]
        current = self.client.get(kind, meta["namespace"], meta["name"])
        if current is None:
            try:
                created = self.client.create(child)
            except AlreadyExists:  # a concurrent pass created it first
                return self.client.get(kind, meta["namespace"], meta["name"]) or child
            self.post_event(body, "Normal", "Created", f"created {kind} {meta['name']}")
            return created
        if kind in CREATE_ONLY_KINDS or not differs(child, current):
            return current
        patched = self.client.merge_patch(kind, meta["namespace"], meta["name"], merge_patch(child, current))
        self.post_event(body, "Normal", "Updated", f"updated {kind} {meta['name']} to match the spec")
        return patched

    def prune(self, body: dict, target: Target, desired: list[dict]) -> None:
        wanted = {(child["kind"], child["metadata"]["name"]) for child in desired}
        selector = f"{resources.LABEL_MODEL_DEPLOYMENT}={target.name}"
        for kind in PRUNABLE_KINDS:
            for obj in self.client.list(kind, target.namespace, selector):
                name = obj["metadata"]["name"]
                if (kind, name) not in wanted and self._owned_by(obj, target):
                    self.client.delete(kind, target.namespace, name)
                    self.post_event(body, "Normal", "Deleted", f"deleted {kind} {name}: the spec no longer needs it")

    @staticmethod
    def _owned_by(obj: dict, target: Target) -> bool:
        return any(ref.get("uid") == target.uid for ref in obj["metadata"].get("ownerReferences") or [])

    # --- status --------------------------------------------------------------------------

    def write_status(self, body: dict, target: Target, observed: statuses.Observed) -> dict:
        old = body.get("status") or {}
        new = statuses.compute(target, observed, body["metadata"].get("generation"), old, now_rfc3339())
        if new == {key: old.get(key) for key in new}:
            return new
        self.client.merge_patch("ModelDeployment", target.namespace, target.name, {"status": new}, "status")
        phase_changed = new["phase"] != old.get("phase")
        new_failure = new["phase"] == statuses.FAILED and new["message"] != old.get("message")
        if phase_changed or new_failure:
            event_type = "Warning" if new["phase"] in (statuses.FAILED, statuses.DEGRADED) else "Normal"
            self.post_event(body, event_type, new["phase"], new["message"])
        return new
