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
    ├── StateConflictError       (RuntimeError)       another controller wrote the state: this one is fenced
    ├── ControllerUnavailableError (ConnectionError)  the controller died or is not ready yet
    ├── ControllerNotFoundError  (LookupError)        no running service/controller to talk to
    ├── RequestError             (ValueError)         a generation request is invalid
    └── OverloadedError          (RuntimeError)       a replica's admission queue is full: retry later (429)

Each class knows the HTTP status (``http_status``) and the CLI exit code (``exit_code``) it maps to;
:func:`unwrap` turns Ray's wrappers (a task error around one of these, a dead actor) into one of them.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterFetchError",
    "AdapterNotFoundError",
    "AdapterValidationError",
    "ConfigError",
    "HotswapError",
    "OverloadedError",
    "ControllerNotFoundError",
    "ControllerUnavailableError",
    "RequestError",
    "RolloutConflictError",
    "RolloutError",
    "StateConflictError",
    "SwapError",
    "UnsafePathError",
    "unwrap",
]

EXIT_OK, EXIT_REJECTED, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


class HotswapError(Exception):
    """Base class of every error raised by hotswap."""

    http_status = 500
    exit_code = EXIT_REJECTED


class ConfigError(HotswapError, ValueError):
    """A setting, application argument or CLI argument is invalid."""

    http_status = 400
    exit_code = EXIT_USAGE


class AdapterError(HotswapError):
    """An error about one adapter version; ``uri`` names it."""

    def __init__(self, message: str, *, uri: str) -> None:
        super().__init__(message)
        self.uri = uri

    def __reduce__(self):  # ``uri`` is keyword-only, so the default pickling would lose it
        return (_rebuild_adapter_error, (type(self), self.args[0], self.uri))


class AdapterNotFoundError(AdapterError, FileNotFoundError):
    """No adapter exists at the URI."""

    http_status = 404


class AdapterFetchError(AdapterError, OSError):
    """The adapter store could not be read, even after bounded retries."""

    http_status = 502


class UnsafePathError(AdapterError, PermissionError):
    """A local adapter path resolves outside the local store root."""

    http_status = 403


class AdapterValidationError(AdapterError, ValueError):
    """An adapter was rejected. ``problems`` lists every reason, each a full sentence."""

    http_status = 422

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

    http_status = 409


class StateConflictError(HotswapError, RuntimeError):
    """The persisted state was written by another controller: this one is fenced and serves no operation."""

    http_status = 409


class ControllerUnavailableError(HotswapError, ConnectionError):
    """The controller died mid-call or is still starting (waiting for its initial adapter or its state store)."""

    http_status = 503
    exit_code = EXIT_UNAVAILABLE


class ControllerNotFoundError(HotswapError, LookupError):
    """No running hotswap service (Ray cluster or controller actor) could be reached."""

    http_status = 503
    exit_code = EXIT_USAGE


class RequestError(HotswapError, ValueError):
    """A generation request is invalid (prompt too long, bad sampling values, ...)."""

    http_status = 400


class OverloadedError(HotswapError, RuntimeError):
    """A replica's admission queue is full; the request was not taken (retry after ``retry_after_s``)."""

    http_status = 429

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def unwrap(error: BaseException) -> BaseException:
    """The error that matters behind Ray's wrappers: our own error inside a task error, a dead controller as
    :class:`ControllerUnavailableError`; anything else unchanged."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, HotswapError):
        return cause
    try:
        from ray.exceptions import RayActorError
    except ImportError:  # pragma: no cover - ray is a dependency
        return error
    if isinstance(error, RayActorError) or isinstance(cause, RayActorError):
        return ControllerUnavailableError(
            "the hotswap controller died during the call; it restarts by itself and resumes any operation in "
            "progress: run 'hotswap status' to see where it stands, then retry if needed"
        )
    return error


def _rebuild_adapter_error(cls: type[AdapterError], message: str, uri: str) -> AdapterError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.uri = uri
    return error
