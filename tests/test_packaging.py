"""The package list in pyproject.toml must name every package folder."""

import pathlib
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    mapping = {folder: name for name, folder in config["package-dir"].items()}
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        parts = init.parent.relative_to(ROOT).parts
        if parts[0] in {".venv", "tests", "benchmarks"} or any(p.startswith(".") for p in parts):
            continue
        top = mapping.get(parts[0], parts[0])
        found.add(".".join((top, *parts[1:])))
    assert found == listed
