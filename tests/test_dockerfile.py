"""The Dockerfile: hadolint-clean, two targets, pinned bases, non-root, and a build context that has what it copies.

No Docker engine runs in CI, so the images are not built here; these checks
read the Dockerfile the way `docker build` would.
"""

from __future__ import annotations

import fnmatch
import pathlib
import re
import shlex
import subprocess
import sys
import tomllib

import pytest

from model_operator import resources

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = pathlib.Path(sys.executable).parent / "hadolint"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines()
                                            if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in joined.splitlines() if line.strip()]


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions of each named build stage."""
    found: dict[str, list[tuple[str, str]]] = {}
    current = None
    for instruction, arguments in instructions():
        if instruction == "FROM":
            current = arguments.split(" AS ")[1].strip()
            found[current] = []
        elif current:
            found[current].append((instruction, arguments))
    return found


def build_args() -> dict[str, str]:
    return dict(arguments.split("=", 1) for instruction, arguments in instructions()
                if instruction == "ARG" and "=" in arguments)


def last(stage: str, instruction: str) -> str:
    return [arguments for name, arguments in stages()[stage] if name == instruction][-1]


def test_hadolint_reports_nothing():
    result = subprocess.run([str(HADOLINT), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_engine_and_operator_targets_exist():
    assert {"engine", "operator"} <= set(stages())


@pytest.mark.parametrize("image_arg", ["PYTHON_IMAGE", "CUDA_IMAGE"])
def test_base_images_are_pinned_to_a_release_tag(image_arg):
    image = build_args()[image_arg]
    name, _, tag = image.rpartition(":")
    assert name and re.match(r"^\d+\.\d+\.\d+-", tag), image


def test_torch_is_pinned_to_the_version_the_makefile_installs():
    makefile_pin = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert build_args()["TORCH_VERSION"] == makefile_pin


@pytest.mark.parametrize("stage", ["engine", "operator"])
def test_images_run_as_the_non_root_user_the_operator_expects(stage):
    assert last(stage, "USER") == f"{resources.RUN_AS_USER}:{resources.RUN_AS_USER}"


def test_engine_image_serves_from_models_with_a_healthcheck():
    assert last("engine", "ENTRYPOINT") == '["kubellm"]'
    assert resources.MODELS_DIR in last("engine", "VOLUME")
    assert "/health" in last("engine", "HEALTHCHECK")
    install = " ".join(arguments for name, arguments in stages()["engine"] if name == "RUN")
    assert "[engine,server]" in install and "torch==${TORCH_VERSION}" in install
    assert {"gcc", "python3-dev"} <= set(install.split()), "Triton builds its launchers at runtime"


def test_operator_image_runs_the_operator_without_torch():
    assert last("operator", "ENTRYPOINT") == '["kubellm-operator"]'
    install = " ".join(arguments for name, arguments in stages()["operator"] if name == "RUN")
    assert "[operator]" in install and "torch" not in install


def dockerignore_admits(path: str) -> bool:
    """.dockerignore semantics for plain patterns: the last matching line wins, `!` re-includes."""
    admitted = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            admitted = negated
    return admitted


def test_build_context_holds_every_package_the_wheel_needs():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {setuptools["package-dir"].get(package.split(".")[0], package.split(".")[0])
               for package in setuptools["packages"]}
    copied = {source for name, arguments in stages()["wheel"] if name == "COPY"
              for source in shlex.split(arguments)[:-1]}
    assert folders | {"pyproject.toml", "README.md"} <= copied
    for source in copied:
        assert dockerignore_admits(source), source
    assert not dockerignore_admits(".venv") and not dockerignore_admits("tests")
