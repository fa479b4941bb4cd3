"""`kubellm-operator` / `python -m model_operator`: run the ModelDeployment operator.

Every setting is a flag whose default comes from an environment variable (the
Helm chart and manifests/install.yaml set the variables); `--help` lists both.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import kopf

WATCH_NAMESPACES_ENV = "KUBELLM_WATCH_NAMESPACES"
HEALTH_ADDRESS_ENV = "KUBELLM_HEALTH_ADDRESS"
HEALTH_PORT_ENV = "KUBELLM_HEALTH_PORT"
LOG_LEVEL_ENV = "KUBELLM_LOG_LEVEL"
DEFAULT_HEALTH_ADDRESS = "0.0.0.0"  # the kubelet probes the pod's IP
DEFAULT_HEALTH_PORT = 8080
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def watched_namespaces(value: str | None) -> list[str]:
    return [namespace.strip() for namespace in (value or "").split(",") if namespace.strip()]


def port_number(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value!r} is not a TCP port (1-65535)")
    return port


def log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.upper()


@dataclass(frozen=True)
class Settings:
    namespaces: list[str]
    health_address: str
    health_port: int
    log_level: str

    @property
    def liveness_endpoint(self) -> str:
        host = f"[{self.health_address}]" if ":" in self.health_address else self.health_address
        return f"http://{host}:{self.health_port}/healthz"


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Flags default to their environment variables, so a flag given on the command line wins."""
    parser = argparse.ArgumentParser(
        prog="kubellm-operator", allow_abbrev=False,
        description="Reconcile kubellm ModelDeployments: engine Deployment, Service, model cache and autoscaler. "
                    "Credentials come from the pod's service account, else from $KUBECONFIG or ~/.kube/config. "
                    f"The engine image for ModelDeployments without spec.engine.image is "
                    f"$KUBELLM_DEFAULT_ENGINE_IMAGE.")
    parser.add_argument("--namespaces", default=environ.get(WATCH_NAMESPACES_ENV, ""), metavar="NS[,NS...]",
                        help=f"comma-separated namespaces to watch; empty watches all namespaces "
                             f"(env {WATCH_NAMESPACES_ENV})")
    parser.add_argument("--health-address", default=environ.get(HEALTH_ADDRESS_ENV) or DEFAULT_HEALTH_ADDRESS,
                        metavar="ADDRESS",
                        help=f"address the liveness endpoint GET /healthz listens on "
                             f"(env {HEALTH_ADDRESS_ENV}, default {DEFAULT_HEALTH_ADDRESS})")
    parser.add_argument("--health-port", type=port_number,
                        default=environ.get(HEALTH_PORT_ENV) or str(DEFAULT_HEALTH_PORT), metavar="PORT",
                        help=f"port of the liveness endpoint (env {HEALTH_PORT_ENV}, default {DEFAULT_HEALTH_PORT})")
    parser.add_argument("--log-level", type=log_level, default=environ.get(LOG_LEVEL_ENV) or "INFO",
                        help=f"{', '.join(LOG_LEVELS)} (env {LOG_LEVEL_ENV}, default INFO)")
    return parser


def parse_settings(argv: list[str] | None = None, environ: Mapping[str, str] = os.environ) -> Settings:
    """Flags, else environment variables, else defaults; bad values exit 2 with a one-line message."""
    args = build_parser(environ).parse_args(argv)
    return Settings(watched_namespaces(args.namespaces), args.health_address, args.health_port, args.log_level)


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(argv)
    from model_operator import handlers  # noqa: F401  (registers the handlers with kopf)

    kopf.configure(debug=settings.log_level == "DEBUG", quiet=settings.log_level in ("WARNING", "ERROR"))
    if settings.log_level == "ERROR":  # kopf's quietest level is WARNING
        logging.getLogger().setLevel(logging.ERROR)
    # One operator replica (the chart runs one, with Recreate): no peering CRD needed.
    kopf.run(standalone=True, clusterwide=not settings.namespaces, namespaces=settings.namespaces,
             liveness_endpoint=settings.liveness_endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
