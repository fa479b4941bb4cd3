"""Exceptions that cross module boundaries.

The server maps these to HTTP statuses (InvalidRequestError -> 400, ...) and the
CLI to one-line messages, so every user-facing failure is one of these types.
"""


class KubellmError(Exception):
    """Base class for errors raised by kubellm on purpose."""


class InvalidRequestError(KubellmError, ValueError):
    """A request or parameter the user can fix (bad SamplingParams, prompt too long).

    `param` names the offending field when there is one, as OpenAI's error body does.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(KubellmError, ValueError):
    """An engine setting that cannot work (flag out of range, incompatible options)."""


class ModelLoadError(KubellmError):
    """A model folder that cannot be loaded; the message names the file or tensor."""


class UnsupportedModelError(ModelLoadError):
    """config.json names an architecture kubellm does not implement."""


class EngineDeadError(KubellmError):
    """The step loop (or a tensor-parallel worker) died; the process must restart."""
