"""Tensor parallelism across processes: one rank per GPU (or CPU process with gloo).

Rank 0 is the engine's own process: it schedules, samples and sends each
step's inputs to the other ranks, which are worker processes started and
watched by `Executor`. Every rank runs the same ModelRunner on its slice of
the weights and KV cache; the model's layers join the slices with collectives.
"""

from engine.distributed.executor import Executor
from engine.distributed.validation import check_tensor_parallel

__all__ = ["Executor", "check_tensor_parallel"]
