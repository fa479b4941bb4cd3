"""Build real Hugging Face-format model folders locally (model hubs are unreachable from CI)."""

from engine.testing.factory import DEFAULT_SERVED_NAME, default_model_path, make_model_folder

__all__ = ["DEFAULT_SERVED_NAME", "default_model_path", "make_model_folder"]
