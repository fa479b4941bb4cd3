"""Where kubellm keeps what it builds once and reuses: $KUBELLM_CACHE_DIR, else ~/.cache/kubellm."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$KUBELLM_CACHE_DIR, else ~/.cache/kubellm."""
    configured = os.environ.get("KUBELLM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "kubellm"
