"""The benchmark record helpers, now in the package (`graphserve.benchmarks.common`); kept for perf/ scripts."""
from graphserve.benchmarks.common import environment, git_sha, write_record

__all__ = ["environment", "git_sha", "write_record"]
