"""A ModelDeployment spec as the builders read it: defaults applied, source parsed.

The API server fills schema defaults before the operator sees an object; applying
the same defaults here (from the CRD's own schema, not a second copy) lets the
builders read every field without `.get(..., fallback)` and keeps them correct on
servers or tests that skip defaulting.
"""

from __future__ import annotations

import copy
import functools
import os
from dataclasses import dataclass

from model_operator import crd
from model_operator.defaulting import apply_schema_defaults

DEFAULT_ENGINE_IMAGE = "ghcr.io/kubellm/kubellm-engine:0.1.0"
ENGINE_IMAGE_ENV = "KUBELLM_DEFAULT_ENGINE_IMAGE"


@functools.cache
def spec_schema() -> dict:
    """Built once per process: every reconcile defaults its spec against it, and it never changes."""
    return crd.spec_schema()


def with_defaults(spec: dict) -> dict:
    """A deep copy of `spec` with every schema default filled in."""
    return apply_schema_defaults(spec_schema(), copy.deepcopy(spec))


@dataclass(frozen=True)
class ModelSource:
    """model.source split into its parts.

    hf://ORG/NAME -> scheme "hf", repo "ORG/NAME"; pvc://CLAIM/PATH -> scheme "pvc",
    claim "CLAIM", path "PATH" ("" for the claim's root); file:///PATH -> scheme "file", path "/PATH".
    """

    scheme: str
    repo: str = ""
    claim: str = ""
    path: str = ""


def parse_source(source: str) -> ModelSource:
    scheme, _, rest = source.partition("://")
    if scheme == "hf":
        return ModelSource("hf", repo=rest)
    if scheme == "pvc":
        claim, _, path = rest.partition("/")
        return ModelSource("pvc", claim=claim, path=path.strip("/"))
    if scheme == "file":
        return ModelSource("file", path=rest)
    raise ValueError(f"model.source {source!r} must start with hf://, pvc:// or file:///")


def default_engine_image() -> str:
    return os.environ.get(ENGINE_IMAGE_ENV) or DEFAULT_ENGINE_IMAGE
