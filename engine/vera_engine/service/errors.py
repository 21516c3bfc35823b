"""The service's exceptions, in one place.

:class:`ServiceError` and its subclasses are the refusals the engine core (`engine.Engine`) raises to whoever
embeds it; each carries the name of the gRPC status code the servicer answers with (``code``), so the servicer
translates them without knowing each one. The others are how the parts of the service tell each other what
happened to a job (:class:`JobCancelled`, :class:`WorkerLost`) or why the engine cannot start
(:class:`SpoolInUse`, :class:`ClusterError`).
"""

from __future__ import annotations


class ServiceError(Exception):
    """A request the engine refuses; ``code`` is the gRPC status code name it is answered with."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InputError(ServiceError, ValueError):
    """Bad input from a client; ``field`` names the offending field for the INVALID_ARGUMENT message."""

    code = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFull(ServiceError):
    """The queue already holds as many waiting jobs as it may (RESOURCE_EXHAUSTED)."""

    code = "RESOURCE_EXHAUSTED"


class JobNotFound(ServiceError):
    """No job of that id is known (never was, or past its retention) (NOT_FOUND)."""

    code = "NOT_FOUND"


class WrongJobState(ServiceError):
    """The job exists but its state does not allow the request: cancel an ended job, fetch an unfinished one
    (FAILED_PRECONDITION)."""

    code = "FAILED_PRECONDITION"


class ResultRemoved(ServiceError):
    """A result file of a succeeded job is gone from the spool (NOT_FOUND)."""

    code = "NOT_FOUND"


class JobCancelled(Exception):
    """Raised inside a runner to stop a job that was cancelled."""


class WorkerLost(Exception):
    """The worker died while it held a job (its process, Ray actor or node); the message says how."""


class SpoolInUse(RuntimeError):
    """Another engine process holds this spool."""


class ClusterError(RuntimeError):
    """The cluster cannot serve as a pool (unreachable, or without the workers' resource); says which and why."""
