"""Whether Triton kernels run under its CPU interpreter (TRITON_INTERPRET=1): the CPU tests' mode.

Launchers pick small tiles and exact-rounding paths there, since the interpreter runs each
program in numpy and lacks some GPU instructions (inline PTX, FP8 dots).
"""

from __future__ import annotations

import os


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
