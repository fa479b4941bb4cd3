"""Run the real kopf operator against kmock's Kubernetes emulator.

The operator runs in its own thread and event loop (on pytest's loop it hangs at
shutdown) and reaches the emulator through a kubeconfig, as it would reach a
cluster. The emulator has no controllers, so tests play their part: they set a
Job's or a Deployment's status, delete objects, and create the ModelDeployment
only once kopf is watching (the emulator's watch replays existing objects).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable

import kmock
import kopf
import yaml

from model_operator import crd
from model_operator.kube import ADD_ON_KINDS, KINDS

NAMESPACE = "serving"
WAIT_SECONDS = 15.0


def declare_resources(emulator: kmock.KubernetesEmulator) -> None:
    emulator.resources.load_bundled()
    emulator.resources[f"{crd.API_VERSION}/{crd.PLURAL}"] = kmock.ResourceInfo(
        kind=crd.KIND, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
        subresources={"status", "scale"})
    for kind in ADD_ON_KINDS.keys() - {"HorizontalPodAutoscaler"}:  # the add-ons' custom resources
        emulator.resources[f"{KINDS[kind].api_version}/{KINDS[kind].plural}"] = kmock.ResourceInfo(
            kind=kind, namespaced=True, verbs={"get", "list", "watch", "create", "patch", "delete"})


def write_kubeconfig(path, server_url: str) -> None:
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": server_url.rstrip("/")}}],
        "users": [{"name": "tester", "user": {"token": "test-token"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "tester"}}],
    }
    path.write_text(yaml.safe_dump(config))


def test_settings() -> kopf.OperatorSettings:
    """Short timeouts so a test never waits on kopf's production-sized intervals."""
    settings = kopf.OperatorSettings()
    settings.queueing.idle_timeout = 0.5
    settings.queueing.exit_timeout = 2.0
    settings.watching.reconnect_backoff = 0.2
    settings.networking.request_timeout = 10
    return settings


@contextlib.asynccontextmanager
async def operator_thread() -> AsyncIterator[None]:
    """The operator's full lifecycle: startup handlers, watches, handlers, graceful stop.

    Waiting happens off the test's loop: the emulator serves the operator from that loop.
    """
    from model_operator import handlers  # noqa: F401  (registers the handlers)

    stop, ready = threading.Event(), threading.Event()

    def run() -> None:
        # Cluster-wide: kmock cannot parse kopf's namespace listing (GET /api/v1/namespaces).
        asyncio.run(kopf.operator(registry=kopf.get_default_registry(), settings=test_settings(), standalone=True,
                                  clusterwide=True, stop_flag=stop, ready_flag=ready))

    thread = threading.Thread(target=run, name="kopf-operator", daemon=True)
    thread.start()
    try:
        assert await asyncio.to_thread(ready.wait, WAIT_SECONDS), "the operator did not start"
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, WAIT_SECONDS)
        assert not thread.is_alive(), "the operator did not stop"


async def eventually(check: Callable[[], object], what: str, timeout: float = WAIT_SECONDS) -> object:
    """Poll until `check()` is truthy (the operator works in another thread)."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def stored(emulator: kmock.KubernetesEmulator, kind: str, name: str, namespace: str = NAMESPACE) -> dict | None:
    """The emulator's current copy of an object, or None."""
    resource = f"{KINDS[kind].api_version}/{KINDS[kind].plural}"
    try:  # `in` does not parse "group/version/plural" keys, indexing does
        obj = emulator.objects[resource, namespace, name]
    except KeyError:
        return None
    return None if obj.deleted else obj.raw
