"""The reproducibility checker: verdicts from the results store alone.

- ``load``: record files to ``Run``s; ``index``: which files need reading (a per-sweep index
  of what each file gave); ``memo``: statistics already computed, by their inputs;
- ``stats``: seed spread with bootstrap intervals, P(A>B), and the thresholds;
- ``power``: the difference a group's seeds could detect, the seeds a difference needs;
- ``across``: per model over categories and seeds, rliable's aggregates and P(A>B);
- ``pairs``: determinism and cross-environment verdicts on pairs of runs;
- ``groups``: grouping, comparisons, searches, and ``check()`` itself;
- ``summary``: the terminal table and the lines the report shares.
"""

from harness.check.groups import CHECK_SCHEMA, CheckReport, Comparison, Group, Search, check
from harness.check.index import load_store
from harness.check.load import Run, Store
from harness.check.pairs import DEFAULT_TOLERANCE
from harness.check.stats import Stat
from harness.check.summary import to_text

__all__ = [
    "CHECK_SCHEMA",
    "DEFAULT_TOLERANCE",
    "CheckReport",
    "Comparison",
    "Group",
    "Run",
    "Search",
    "Stat",
    "Store",
    "check",
    "load_store",
    "to_text",
]
