"""The exceptions hotswap raises, in one place.

Every error subclasses :class:`HotswapError` and also the built-in exception it means,
so callers may catch either::

    HotswapError
    ├── ConfigError              (ValueError)         a setting or argument is invalid
    ├── AdapterError                                  something about one adapter version
    │   ├── AdapterNotFoundError (FileNotFoundError)  nothing at the URI
    │   ├── AdapterFetchError    (OSError)            the store failed after bounded retries
    │   ├── UnsafePathError      (PermissionError)    a local path escapes the store root
    │   └── AdapterValidationError (ValueError)       the adapter is unusable; lists every problem
    ├── SwapError                (RuntimeError)       applying a staged adapter to a model failed
    ├── RolloutError             (RuntimeError)       a rollout failed on a replica and was reverted
    ├── RolloutConflictError     (RuntimeError)       the operation conflicts with the current state
    ├── ControllerNotFoundError  (LookupError)        no running service/controller to talk to
    └── RequestError             (ValueError)         a generation request is invalid
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterFetchError",
    "AdapterNotFoundError",
    "AdapterValidationError",
    "ConfigError",
    "HotswapError",
    "ControllerNotFoundError",
    "RequestError",
    "RolloutConflictError",
    "RolloutError",
    "SwapError",
    "UnsafePathError",
]


class HotswapError(Exception):
    """Base class of every error raised by hotswap."""


class ConfigError(HotswapError, ValueError):
    """A setting, application argument or CLI argument is invalid."""


class AdapterError(HotswapError):
    """An error about one adapter version; ``uri`` names it."""

    def __init__(self, message: str, *, uri: str) -> None:
        super().__init__(message)
        self.uri = uri

    def __reduce__(self):  # ``uri`` is keyword-only, so the default pickling would lose it
        return (_rebuild_adapter_error, (type(self), self.args[0], self.uri))


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """No adapter exists at the URI."""


class AdapterFetchError(AdapterError, OSError):
    """The adapter store could not be read, even after bounded retries."""


class UnsafePathError(AdapterError, PermissionError):
    """A local adapter path resolves outside the local store root."""


class AdapterValidationError(AdapterError, ValueError):
    """An adapter was rejected. ``problems`` lists every reason, each a full sentence."""

    def __init__(self, uri: str, problems: list[str]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        listed = " ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"adapter {uri} rejected, {count} {noun}: {listed}", uri=uri)

    def __reduce__(self):  # keep ``problems`` across pickling (Ray ships errors between processes)
        return (type(self), (self.uri, self.problems))


class SwapError(HotswapError, RuntimeError):
    """Applying a staged adapter to a model failed; the model was restored to its previous adapter."""


class RolloutError(HotswapError, RuntimeError):
    """A rollout failed on a replica; every replica it had moved was put back on its previous version."""


class RolloutConflictError(HotswapError, RuntimeError):
    """The operation conflicts with the controller's state (a rollout in progress, no canary to promote, ...)."""


class ControllerNotFoundError(HotswapError, LookupError):
    """No running hotswap service (Ray cluster or controller actor) could be reached."""


class RequestError(HotswapError, ValueError):
    """A generation request is invalid (prompt too long, bad sampling values, ...)."""


def _rebuild_adapter_error(cls: type[AdapterError], message: str, uri: str) -> AdapterError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.uri = uri
    return error
