"""One exception hierarchy for labeling jobs (every error names what was wrong)."""

from __future__ import annotations


class LabelingError(Exception):
    """Base of every labeling error."""


class SeedError(LabelingError, ValueError):
    """The ground-truth seed is too small or too thin for a trustworthy run (see ``--allow-sparse-seed``)."""


class RunNotFoundError(LabelingError, KeyError):
    def __init__(self, run_id: str, known: list[str]) -> None:
        super().__init__(run_id)
        self.run_id = run_id
        self.known = known

    def __str__(self) -> str:
        shown = ", ".join(self.known[-5:]) or "none"
        return f"no labeling run {self.run_id!r} in this collection (recent runs: {shown})"


class RunStateError(LabelingError, RuntimeError):
    """A run command that does not fit the run's state (e.g. rolling back a run that is not the active one)."""


class ReviewFileError(LabelingError, ValueError):
    """A review import file that cannot be applied; nothing was written."""


class UnknownAnswerIdsError(ReviewFileError, LookupError):
    """Answers for ids the collection does not hold; nothing was written (NOT_FOUND over gRPC)."""


class LabelConflictError(ReviewFileError):
    """Answers that would replace a different human label; nothing was written."""


class JobCancelledError(LabelingError):
    """The job was cancelled by its caller (a cancelled write is replaced by the next run)."""


class JobRunningError(LabelingError, RuntimeError):
    """A labeling job is already running on this collection."""


class JobPreconditionError(LabelingError, RuntimeError):
    """A job that cannot give a trustworthy result in the collection's present state, refused before any work
    (points embedded with two projections; a runs directory that cannot be written). FAILED_PRECONDITION."""
