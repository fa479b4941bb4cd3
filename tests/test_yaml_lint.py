"""yamllint (the repository's .yamllint) on every YAML file, and on the chart as Helm renders it.

Chart templates are Go templates, not YAML, so .yamllint ignores them; their
rendered output, for every documented option, is linted instead.
"""

from __future__ import annotations

import pathlib
import subprocess

import pytest
from yamllint import linter
from yamllint.config import YamlLintConfig

from helm_render import ROOT, render_templates
from test_chart import OPTIONS, PROMETHEUS_OPERATOR

CONFIG = YamlLintConfig(file=str(ROOT / ".yamllint"))


def tracked_yaml_files() -> list[pathlib.Path]:
    """Tracked and new (not ignored) YAML files, so stray local files do not count."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.yaml", "*.yml",
                             ".yamllint"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [ROOT / name for name in listed if not CONFIG.is_file_ignored(name) and (ROOT / name).exists()]


def problems(text: str, path: str) -> list[str]:
    """yamllint's findings; `path` (relative to the root) selects the per-file rule exceptions."""
    return [f"{problem.line}:{problem.column} {problem.message}" for problem in linter.run(text, CONFIG, path)]


def test_the_repository_has_yaml_to_lint():
    names = {path.relative_to(ROOT).as_posix() for path in tracked_yaml_files()}
    assert {"charts/kubellm/values.yaml", "manifests/install.yaml", "manifests/crd.yaml"} <= names


@pytest.mark.parametrize("path", tracked_yaml_files(), ids=lambda path: path.relative_to(ROOT).as_posix())
def test_yaml_file_passes_yamllint(path):
    assert problems(path.read_text(), path.relative_to(ROOT).as_posix()) == []


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_rendered_chart_passes_yamllint(option):
    for template, text in render_templates(OPTIONS[option], api_versions=PROMETHEUS_OPERATOR).items():
        if template.endswith(".yaml"):
            # A template's leading newline (after `{{- if ... }}`) is templating residue that
            # `helm template` output never shows, so it is not held against the chart.
            assert problems(text.lstrip("\n"), f"charts/rendered/{template}") == [], template
