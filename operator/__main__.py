"""`kubellm-operator` / `python -m model_operator`: run the ModelDeployment operator.

Settings come from the environment (the Helm chart and manifests/install.yaml set them):
  KUBELLM_WATCH_NAMESPACES      comma-separated namespaces to watch; empty or unset = all namespaces
  KUBELLM_DEFAULT_ENGINE_IMAGE  engine image for ModelDeployments that set no spec.engine.image
  KUBELLM_HEALTH_PORT           port of the liveness endpoint GET /healthz (default 8080)
  KUBELLM_LOG_LEVEL             DEBUG, INFO (default), WARNING or ERROR
"""

from __future__ import annotations

import logging
import os
import sys

import kopf

WATCH_NAMESPACES_ENV = "KUBELLM_WATCH_NAMESPACES"
HEALTH_PORT_ENV = "KUBELLM_HEALTH_PORT"
LOG_LEVEL_ENV = "KUBELLM_LOG_LEVEL"
DEFAULT_HEALTH_PORT = 8080


def watched_namespaces(value: str | None) -> list[str]:
    return [namespace.strip() for namespace in (value or "").split(",") if namespace.strip()]


def main() -> int:
    from model_operator import handlers  # noqa: F401  (registers the handlers with kopf)

    namespaces = watched_namespaces(os.environ.get(WATCH_NAMESPACES_ENV))
    port = int(os.environ.get(HEALTH_PORT_ENV) or DEFAULT_HEALTH_PORT)
    level = (os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    kopf.configure(debug=level == "DEBUG", quiet=level in ("WARNING", "ERROR"))
    if level == "ERROR":  # kopf's quietest level is WARNING
        logging.getLogger().setLevel(logging.ERROR)
    # One operator replica (the chart runs one, with Recreate): no peering CRD needed.
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=f"http://0.0.0.0:{port}/healthz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
