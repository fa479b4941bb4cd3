"""Suite-wide setup.

TRITON_INTERPRET must be set before any @triton.jit kernel is defined, so it is
set here, before tests import kernels, whenever no GPU is present.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # the operator-only tests need no torch
    pass


# Engine-core fixtures: one tiny model folder per family for the whole session --------------

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_folder(tmp_path_factory):
    """family -> path of a tiny fp32 model folder (llama, qwen2, mistral), built once per session."""
    from engine.testing import make_model_folder

    built = {}

    def folder(family: str = "llama"):
        if family not in built:
            built[family] = make_model_folder(tmp_path_factory.mktemp(f"tiny-{family}"), family=family)
        return built[family]

    return folder


# Server fixtures most server test modules share (a module defines its own to change them) ----------


@pytest.fixture(scope="module")
def server():
    """A real uvicorn serving the default tiny model, one per test module."""
    from server_harness import running_server

    with running_server() as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.fixture(scope="module")
def offline():
    """The offline LLM on the server's model and settings: what served outputs must equal."""
    from server_harness import offline_llm

    return offline_llm()
