"""kopf handlers: when to reconcile a ModelDeployment.

The ModelDeployment's own create / update (spec) / resume events reconcile it
with retries and backoff; events on its children (a deleted Service, an edited
Deployment, a Job or Deployment whose status moved) reconcile the owner once,
which restores drift and keeps the status true. All work is in reconcile.py.
"""

from __future__ import annotations

import logging

import kopf

from model_operator import crd, kube, resources
from model_operator.kube import CHILD_KINDS, KINDS, ApiError
from model_operator.reconcile import Reconciler, SpecError
from model_operator.spec import default_engine_image

RETRY_BASE_SECONDS = 10.0
RETRY_MAX_SECONDS = 600.0
MANAGED_BY = {"app.kubernetes.io/managed-by": "kubellm-operator"}
WATCHED_CHILD_KINDS = CHILD_KINDS


def retry_delay(retry: int) -> float:
    """Exponential backoff for specs that cannot work yet (a Secret still to be created)."""
    return min(RETRY_BASE_SECONDS * 2 ** retry, RETRY_MAX_SECONDS)


def post_event(body: dict, event_type: str, reason: str, message: str) -> None:
    kopf.event(body, type=event_type, reason=reason, message=message)


@kopf.on.login()
def login(**kwargs) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else $KUBECONFIG (read when called, unlike kopf's client login)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_) -> None:
    # Progress and the last-handled spec live in annotations: the status subresource is ours alone.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=crd.GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=crd.GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING  # kopf's own log lines become Events only when they matter
    kube.configure()
    memo.client = kube.Client()
    memo.reconciler = Reconciler(memo.client, default_engine_image(), post_event)


@kopf.on.resume(crd.GROUP, crd.VERSION, crd.PLURAL)
@kopf.on.create(crd.GROUP, crd.VERSION, crd.PLURAL)
@kopf.on.update(crd.GROUP, crd.VERSION, crd.PLURAL, field="spec")
def reconcile_model_deployment(namespace: str, name: str, retry: int, memo: kopf.Memo, **_) -> None:
    try:
        memo.reconciler.reconcile(namespace, name)
    except (SpecError, ApiError) as error:  # already on the status and in an Event
        raise kopf.TemporaryError(str(error), delay=retry_delay(retry))


def reconcile_owner(labels: kopf.Labels, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_) -> None:
    owner = labels.get(resources.LABEL_MODEL_DEPLOYMENT, "")
    try:
        memo.reconciler.reconcile(namespace, owner)
    except (SpecError, ApiError) as error:  # the owner's own handler retries it
        logger.warning("reconciling %s/%s failed: %s", namespace, owner, error)


for _kind in WATCHED_CHILD_KINDS:
    kopf.on.event(KINDS[_kind].group, KINDS[_kind].version, KINDS[_kind].plural, labels=MANAGED_BY,
                  id=f"reconcile-owner-of-{_kind}")(reconcile_owner)


@kopf.on.probe(id="reconciler")
def reconciler_ready(memo: kopf.Memo, **_) -> bool:
    """Shown as "reconciler": true in /healthz's JSON once startup configured it (kopf answers 200 either way)."""
    return hasattr(memo, "reconciler")
