"""README.md stays true: generated reference sections match the code, and what it names exists."""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

import gen_reference
from engine.builtin_model import BUILTIN_MODEL_NAME
from engine.cli import build_parser
from helm_render import CHART_DIR, ROOT, render_objects
from model_operator import crd
from operator_fixtures.schema import admission_errors

README = (ROOT / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.DOTALL)


def test_generated_sections_match_the_code():
    assert README == gen_reference.render(README), "regenerate with: python tools/gen_reference.py"


def test_every_command_line_flag_is_documented():
    for name, command in gen_reference.subcommands(build_parser()).items():
        assert f"#### `kubellm {name}`" in README
        for action in command._actions:
            if not isinstance(action, argparse._HelpAction):
                for option in action.option_strings or [action.metavar or action.dest.upper()]:
                    assert f"`{option}" in README or f"/ {option}`" in README, option


def spec_field_paths(schema: dict, path: str):
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}"
        yield from spec_field_paths(sub, f"{path}.{name}")
    if schema.get("type") == "array":
        yield from spec_field_paths(schema["items"], f"{path}[]")


def test_every_model_deployment_field_is_documented():
    paths = list(spec_field_paths(crd.open_api_schema()["properties"]["spec"], "spec"))
    assert len(paths) > 40
    for path in paths:
        assert f"| `{path}`" in README, path


def test_every_metric_is_documented():
    from types import SimpleNamespace

    from engine.server.metrics import ServerMetrics

    registry = ServerMetrics(SimpleNamespace(stats=None, num_waiting=0), "m").registry
    for family in registry.collect():
        assert f"`{family.name}" in README, family.name


def test_the_two_user_commands_come_first():
    first_section = README.split("\n## ")[1]
    assert first_section.startswith("Two commands") and "make serve" in first_section and "make test" in first_section
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^serve:", makefile, re.MULTILINE) and re.search(r"^test:", makefile, re.MULTILINE)


def test_both_image_targets_are_documented():
    assert "docker build --target engine " in README and "docker build --target operator " in README


def test_relative_links_point_at_files():
    for target in re.findall(r"\]\(([^)#:]+)\)", README):
        assert (ROOT / target).exists(), target


def test_every_example_is_listed():
    for path in (ROOT / "manifests" / "examples").glob("*.yaml"):
        assert f"| `{path.name}` |" in README, path.name


def test_every_chart_value_is_documented():
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for key in values:
        assert f"`{key}" in README, key


@pytest.mark.parametrize("index", range(len(code_blocks("python"))))
def test_python_examples_compile(index):
    compile(code_blocks("python")[index], f"README.md python block {index}", "exec")


def test_helm_values_example_renders_and_its_models_are_admitted():
    (values_text,) = code_blocks("yaml")
    model_deployments = [document for document in render_objects(yaml.safe_load(values_text))
                         if document["kind"] == crd.KIND]
    assert len(model_deployments) == 2
    for document in model_deployments:
        assert admission_errors(document) == []


# --- the quickstart, run as written ------------------------------------------------------------------

README_PORT = "8000"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def shell_commands(prefix: str) -> list[str]:
    """The README's indented shell commands for the built-in model that start with `prefix`."""
    commands = re.findall(rf"^    ({re.escape(prefix)}.*?)(?<!\\)$", README.replace("\\\n      ", " "), re.MULTILINE)
    return [command for command in commands if BUILTIN_MODEL_NAME in command]


@pytest.fixture(scope="module")
def quickstart_server(tmp_path_factory):
    """`kubellm serve` as `make serve` runs it (the built-in model), on a free port."""
    port = str(free_port())
    log_path = tmp_path_factory.mktemp("quickstart") / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen([str(pathlib.Path(sys.executable).parent / "kubellm"), "serve", "--port", port],
                                  stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # the built-in model's tokenizer and weights are read from its GGUF file
        while not ready(port):
            assert server.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "kubellm serve did not become ready in 300 s"
            time.sleep(0.5)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


def ready(port: str) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_quickstart_curl_commands_work(quickstart_server):
    commands = shell_commands("curl ")
    assert len(commands) == 2
    for command in commands:
        result = subprocess.run(["bash", "-c", command.replace(README_PORT, quickstart_server)],
                                capture_output=True, text=True, timeout=300, check=True)
        if '"stream": true' in command:
            assert result.stdout.rstrip().endswith("data: [DONE]")
        else:
            assert json.loads(result.stdout)["usage"]["completion_tokens"] == 16


def test_quickstart_openai_sdk_example_works(quickstart_server, capsys):
    exec(compile(code_blocks("python")[0].replace(README_PORT, quickstart_server), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is Paris.\n")  # the answer the README shows
    assert "CompletionUsage(completion_tokens=32" in out



def test_kubectl_get_md_output_matches_the_crd_and_the_operator():
    """The install section's `kubectl get md` table: the CRD's printer columns, filled as the operator fills them."""
    from model_operator import resources, status

    (table,) = [block for block in code_blocks("text") if block.startswith("NAME ")]
    header, row = [line.split() for line in table.strip().splitlines()]
    assert header == ["NAME"] + [column["name"].upper() for column in crd.printer_columns()]
    example = yaml.safe_load((ROOT / "manifests" / "examples" / "tiny-cpu.yaml").read_text())
    example["metadata"].update(namespace="default", uid="u-1", generation=1)
    target = resources.Target.from_body(example)
    ready_deployment = {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1, "availableReplicas": 1,
                                   "observedGeneration": 1}}
    stored = status.compute(target, status.Observed({"status": {"succeeded": 1}}, ready_deployment), 1, {}, "now")
    shown = {"NAME": example["metadata"]["name"], "MODEL": example["spec"]["model"]["source"],
             "PHASE": stored["phase"], "READY": str(stored["readyReplicas"]), "REPLICAS": str(stored["replicas"]),
             "ENDPOINT": stored["endpoint"]}
    assert dict(zip(header, row)) == {**shown, "AGE": row[-1]}
def test_compatibility_table_names_every_refused_field_and_every_route():
    from engine.server.responses_api import UNSUPPORTED_RESPONSES_FIELDS

    for field in UNSUPPORTED_RESPONSES_FIELDS:
        assert f"`{field}" in README, field
    from engine.async_engine import AsyncLLMEngine
    from engine.server.app import ServerSettings, build_app

    app = build_app(AsyncLLMEngine(lambda: None), ServerSettings(served_model_name="m"))
    for route in app.routes:
        if getattr(route, "include_in_schema", False):
            assert f"{sorted(route.methods)[0]} {route.path}" in README or f"`{route.path}`" in README, route.path
