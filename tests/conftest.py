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
