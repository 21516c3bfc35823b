"""The in-process backend: the engine's own process as a pool of one worker (``vera-engine serve`` without
``--devices`` or ``--cluster``).

The single-device engine is this pool: its one worker is a :class:`~vera_engine.service.pool.host.WorkerHost` on
the runner the engine was given, run in the engine's process, so a job is claimed, run, cancelled and finished by
the same code whether it runs here, in a local worker process or in a Ray actor (`dispatch.Pool`).

The worker reads the inputs from and writes the results into the spool directly. Tests may make it take its inputs
as bytes instead (``shares_spool=False``), which is how a Ray worker without a shared spool gets them: the front
door's half of that path then runs in milliseconds, without processes or Ray.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vera_engine.service.pool.dispatch import WorkerHandle
from vera_engine.service.pool.host import (
    JobOutcome,
    JobTicket,
    LiveSnapshot,
    RunnerSpec,
    WorkerHost,
    WorkerReport,
    run_relaying,
)
from vera_engine.service.worker import JobRunner

IN_PROCESS_NAME = "local"  # the worker name jobs record (JobStatus.worker)


def _the_runner(runner: JobRunner) -> Callable[[], JobRunner]:
    def build() -> JobRunner:
        return runner

    return build


class InProcessWorker(WorkerHandle):
    """A worker in the engine's process: a WorkerHost on an already built runner."""

    def __init__(
        self, runner: JobRunner, *, preview_interval: float = 1.0, shares_spool: bool = True
    ) -> None:
        super().__init__(IN_PROCESS_NAME, devices=1)
        self.host = WorkerHost(RunnerSpec(_the_runner(runner)), "local", preview_interval=preview_interval)
        self._shares_spool = shares_spool

    @property
    def shares_spool(self) -> bool:
        """True unless a test asked for inputs and results as bytes."""
        return self._shares_spool

    def load(self) -> WorkerReport:
        """Load the runner's model in this process."""
        return self.host.load()

    def run(
        self, ticket: JobTicket, inputs: Mapping[str, bytes] | None, on_update: Callable[[LiveSnapshot], None]
    ) -> JobOutcome:
        """Run the job in the calling thread; its live fields reach ``on_update`` from a relay thread."""
        return run_relaying(self.host, ticket, inputs, on_update)

    def cancel(self, job_id: str) -> None:
        """Stop ``job_id`` within one step (or as it starts, if it has not yet)."""
        self.host.cancel(job_id)

    def want_previews(self, job_id: str, wanted: bool) -> None:
        """Whether anyone watches ``job_id``'s previews."""
        self.host.want_previews(job_id, wanted)

    def lost_reason(self) -> str | None:
        """Never lost: it is the engine's own process."""
        return None

    def close(self) -> None:
        """Nothing to stop: the runner lives as long as the engine."""


class InProcessBackend:
    """One worker, in the engine's process, made once (a model that fails to load is not loaded again)."""

    def __init__(
        self, runner: JobRunner, *, preview_interval: float = 1.0, shares_spool: bool = True
    ) -> None:
        self.runner = runner
        self.preview_interval = preview_interval
        self.shares_spool = shares_spool
        self._made = False

    def describe(self) -> str:
        """The one worker."""
        return "one worker in the engine's process"

    def reconcile(self, current: list[WorkerHandle]) -> list[WorkerHandle]:
        """The worker, the first time only."""
        if self._made:
            return []
        self._made = True
        return [
            InProcessWorker(
                self.runner, preview_interval=self.preview_interval, shares_spool=self.shares_spool
            )
        ]

    def check_placement(self) -> None:
        """Every job fits: it runs on this engine's one device."""

    def close(self) -> None:
        """Nothing beyond the worker."""
