"""labeling: batch self-training jobs against the store (uses ``retrieval`` only).

Entry points: :func:`labeling.job.run_job` (what ``embedstore label run`` and the
gRPC ``RunLabelingJob`` call), :class:`labeling.selftrain.SelfTrainer` (the loop
on arrays), :mod:`labeling.runs` (registry, write-back, rollback),
:mod:`labeling.review` (review queue, human answers, suspicious labels) and
:func:`labeling.inspect.inspect_neighbours`.
"""

from labeling.config import LabelingConfig
from labeling.errors import LabelingError, SeedError
from labeling.job import JobEvent, JobResult, run_job

__all__ = ["JobEvent", "JobResult", "LabelingConfig", "LabelingError", "SeedError", "run_job"]
