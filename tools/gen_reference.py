"""Generate the README's configuration reference from the code that defines it.

Tables live between marker comments in README.md:
  - `kubellm` command-line flags, read from engine.cli.build_parser();
  - `kubellm-operator` flags and their environment variables, from model_operator.__main__.build_parser();
  - the Prometheus metrics, read from the server's metrics registry;
  - ModelDeployment spec fields, read from the CRD schema in operator/crd.py.
tests/test_readme.py fails when README.md differs from what this writes.

    python tools/gen_reference.py      # from the repository root; rewrites README.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from helm_render import ROOT

README = ROOT / "README.md"
BEGIN = "<!-- BEGIN GENERATED {name} (python tools/gen_reference.py) -->"
END = "<!-- END GENERATED {name} -->"


def cell(text: str) -> str:
    """Text that is safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


# --- CLI -----------------------------------------------------------------------------------------


def subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    (action,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return action


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return dict(subparsers(parser).choices)


def command_summaries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each subcommand's description, or the one-line help it was added with."""
    action = subparsers(parser)
    helps = {choice.dest: choice.help for choice in action._choices_actions}
    return {name: command.description or helps.get(name) or "" for name, command in action.choices.items()}


def flag_usage(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest.upper()
    return " / ".join(action.option_strings)


def flag_description(action: argparse.Action) -> str:
    text = (action.help or "") % {"default": action.default, "prog": "", "choices": action.choices}
    if action.choices:
        text += f" Choices: {', '.join(map(str, action.choices))}."
    return text


def flag_table(parser: argparse.ArgumentParser) -> list[str]:
    return ["| Flag | Description |", "|---|---|"] + [
        f"| `{flag_usage(action)}` | {cell(flag_description(action))} |"
        for action in parser._actions if not isinstance(action, argparse._HelpAction)]


def cli_reference() -> str:
    from engine.cli import build_parser

    parser = build_parser()
    summaries = command_summaries(parser)
    lines = []
    for name, command in subcommands(parser).items():
        lines += [f"#### `kubellm {name}`", "", cell(summaries[name]), ""] + flag_table(command) + [""]
    return "\n".join(lines).rstrip("\n")


def operator_reference() -> str:
    """The operator's flags as an empty environment leaves them (the chart sets the variables)."""
    from model_operator.__main__ import build_parser

    parser = build_parser({})
    return "\n".join([cell(parser.description), ""] + flag_table(parser))


# --- metrics -------------------------------------------------------------------------------------

# Prometheus exposes a counter as NAME_total; a histogram as NAME_bucket, NAME_sum and NAME_count.
EXPOSED_SUFFIX = {"counter": "_total"}


def metrics_reference() -> str:
    from types import SimpleNamespace

    from engine.server.metrics import ServerMetrics

    # The registry only reads the engine at scrape time; an engine that has not loaded yet
    # (no stats, empty queue) is enough to list every metric with its type and help.
    metrics = ServerMetrics(SimpleNamespace(stats=None, num_waiting=0), "example")
    metrics.observe_finished("stop")  # labelled counters show their labels once they have a sample
    lines = ["| Metric | Type | Labels | Meaning |", "|---|---|---|---|"]
    for family in metrics.registry.collect():
        labels = sorted({label for sample in family.samples for label in sample.labels} - {"le"})
        lines.append(f"| `{family.name}{EXPOSED_SUFFIX.get(family.type, '')}` | {family.type} | "
                     f"{', '.join(labels)} | {cell(family.documentation)} |")
    return "\n".join(lines)


# --- CRD -----------------------------------------------------------------------------------------


def type_of(schema: dict) -> str:
    if schema.get("x-kubernetes-int-or-string"):
        return "int or string"
    if schema.get("type") == "array":
        return f"list of {type_of(schema['items'])}"
    if schema.get("type") == "object" and "additionalProperties" in schema:
        return "map of string"
    return schema.get("type", "object")


def constraints(schema: dict) -> str:
    parts = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{value}`" for value in schema["enum"]))
    if "minimum" in schema or "maximum" in schema:
        parts.append(f"{schema.get('minimum', '')}..{schema.get('maximum', '')}")
    return "; ".join(parts)


def default_of(schema: dict) -> str:
    """Objects' defaults are their fields' defaults, shown on the fields' own rows."""
    if "default" not in schema or schema.get("type") == "object":
        return ""
    return f"`{json.dumps(schema['default'])}`"


def field_rows(schema: dict, path: str, required: bool) -> list[str]:
    description, limits = schema.get("description", ""), constraints(schema)
    if limits:
        description += f" ({limits})"
    rows = [f"| `{path}`{' (required)' if required else ''} | {type_of(schema)} | {default_of(schema)} "
            f"| {cell(description)} |"]
    for name, sub in schema.get("properties", {}).items():
        rows += field_rows(sub, f"{path}.{name}", name in schema.get("required", []))
    if schema.get("type") == "array" and "properties" in schema["items"]:
        for name, sub in schema["items"]["properties"].items():
            rows += field_rows(sub, f"{path}[].{name}", name in schema["items"].get("required", []))
    return rows


def crd_reference() -> str:
    from model_operator import crd

    spec = crd.spec_schema()
    rows = []
    for name, sub in spec["properties"].items():
        rows += field_rows(sub, f"spec.{name}", name in spec.get("required", []))
    rules = [f"- {validation['message']}" for schema in walk(spec) for validation in
             schema.get("x-kubernetes-validations", [])]
    return "\n".join(["| Field | Type | Default | Description |", "|---|---|---|---|", *rows, "",
                      "The API server also rejects a spec that breaks these rules:", "", *rules])


def walk(schema: dict):
    yield schema
    for sub in schema.get("properties", {}).values():
        yield from walk(sub)
    if "items" in schema:
        yield from walk(schema["items"])


# --- README --------------------------------------------------------------------------------------

SECTIONS = {"cli-reference": cli_reference, "operator-reference": operator_reference,
            "metrics-reference": metrics_reference, "crd-reference": crd_reference}


def replace_section(text: str, name: str, body: str) -> str:
    begin, end = BEGIN.format(name=name), END.format(name=name)
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {begin} ... {end} markers")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def render(readme: str) -> str:
    """`readme` with every generated section brought up to date."""
    for name, build in SECTIONS.items():
        readme = replace_section(readme, name, build())
    return readme


def main() -> int:
    README.write_text(render(README.read_text()))
    print(f"wrote the generated sections of {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
