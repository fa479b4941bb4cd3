"""The real CRDs of KEDA, its HTTP add-on, prometheus-operator and Gateway API (+ Inference Extension).

They are read at test time from the shared folder beside the repository
(../shared/crds, or $KUBELLM_THIRD_PARTY_CRDS), never copied into it. Objects
kubellm emits are checked as a cluster with those projects installed would:
defaulted, then strict structural validation (unknown fields are errors), then
the CRD's own CEL rules.
"""

from __future__ import annotations

import functools
import os
import pathlib

import kubernetes_validate
import pytest
import yaml

from operator_fixtures.schema import admit

ROOT = pathlib.Path(__file__).resolve().parents[2]
CRDS_ENV = "KUBELLM_THIRD_PARTY_CRDS"


def crds_dir() -> pathlib.Path | None:
    """$KUBELLM_THIRD_PARTY_CRDS, else the nearest `shared/crds` beside the repository or a folder above it."""
    if os.environ.get(CRDS_ENV):
        return pathlib.Path(os.environ[CRDS_ENV])
    for folder in ROOT.parents:
        candidate = folder / "shared" / "crds"
        if candidate.is_dir():
            return candidate
    return None


@functools.cache
def served_schemas() -> dict[tuple[str, str], dict]:
    """openAPIV3Schema by (apiVersion, kind) for every served version of every CRD in the folder."""
    folder = crds_dir()
    if folder is None or not folder.is_dir():
        pytest.skip(f"the third-party CRDs are not here: set {CRDS_ENV} to the folder holding them "
                    f"(../shared/crds beside the repository)")
    schemas = {}
    for path in sorted(folder.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if not document or document.get("kind") != "CustomResourceDefinition":
                continue
            spec = document["spec"]
            for version in spec["versions"]:
                if version.get("served"):
                    api_version = f"{spec['group']}/{version['name']}"
                    schemas[api_version, spec["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return schemas


def validation_errors(obj: dict) -> list[str]:
    """Why a cluster with the project installed would reject `obj` (strict field validation)."""
    key = (obj.get("apiVersion"), obj.get("kind"))
    schema = served_schemas().get(key)
    if schema is None:
        return [f"no served CRD for {key[0]} {key[1]} in {crds_dir()}"]
    return admit(obj, schema)[1]


def emitted_object_errors(obj: dict, kubernetes_versions: list[str]) -> list[str]:
    """Built-in kinds against Kubernetes' OpenAPI schemas (kubernetes-validate, strict) for every version,
    custom resources against their project's CRD."""
    errors = []
    for version in kubernetes_versions:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return validation_errors(obj)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"Kubernetes {version}: {error.message}")
    return errors
