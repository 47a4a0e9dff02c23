"""Groups of runs and what the checker concludes about them: ``check()`` and its answer.

Semantics (docs/design.md): runs group by everything but seed and repeat; a seed counts once
(its repeats are the determinism test, not extra samples); trials of a search are not test
runs and only feed the search summary.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, cast

import msgspec
import numpy as np

from harness.check.across import AcrossComparison, Aggregate, Estimates, aggregates, improvement
from harness.check.adaptive import status as adaptive_status
from harness.check.index import load_stores
from harness.check.load import COST, Run, Store, gc_paused
from harness.check.memo import MEMO_DIR, Memo, code_hash, read_framed, write_framed
from harness.check.pairs import (
    DEFAULT_TOLERANCE,
    VERDICTS,
    CrossEnvironment,
    Determinism,
    cross_environment,
    determinism,
    environment_order,
)
from harness.check.power import (
    DEFAULT_DETECT,
    SEEDS_NEEDED_CAP,
    pooled_std,
    remembered_mdd,
    remembered_seeds_needed,
)
from harness.check.sources import SourceShare, base_config, only_source, pins_of, shares, stream_tag
from harness.check.stats import Stat, bootstrap_means, comparison_verdict, probability_of_improvement, seed_mean
from harness.errors import HarnessError
from harness.hashing import stable_hash
from harness.record import QUALITY, SeedsPlan

CHECK_SCHEMA = "harness.check/1"
COMPARED = ("image_AUROC", "pixel_AUROC")
ALL_PAIRS_UP_TO = 8  # groups in a category; with more, each is compared with the best


@dataclass
class Group:
    """Runs that differ only in seed and repeat: one model, config and category of one sweep."""

    sweep: str
    model: str
    category: str
    role: str
    config_id: str
    label: str
    ok: list[Run]
    failed: list[Run]
    stats: dict[str, Stat] = field(default_factory=dict)
    determinism: Determinism = field(default_factory=lambda: Determinism([]))
    cross_environment: list[CrossEnvironment] = field(default_factory=list)
    # With runs in several environments: each one's seed statistics (environment id -> metric).
    env_stats: dict[str, dict[str, Stat]] = field(default_factory=dict)
    base_label: str = ""  # a view's group's label (``label`` adds the environment)
    # Shown per environment: it, or a group of the same label, ran in several.
    split: bool = False
    # An adaptive seed study's status (``adaptive.status``); per environment when it ran in several.
    adaptive: dict[str, Any] | None = None
    env_adaptive: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def environments(self) -> list[str]:
        return environment_order(self.ok)

    def in_environment(self, env: str) -> Group:
        """The group's runs in one environment, with that environment's statistics and
        determinism pairs, labelled ``LABEL in NAME``; the group itself unless it is ``split``."""
        if not self.split:
            return self
        ok = [r for r in self.ok if r.environment_id == env]
        failed = [r for r in self.failed if r.environment_id == env]
        key = (self.sweep, self.model, self.category, self.role, self.config_id)
        label = f"{self.label} in {ok[0].variant or env}" if ok else self.label
        view = Group(*key, label, ok, failed, self.env_stats.get(env, self.stats), base_label=self.label)
        view.adaptive = self.env_adaptive.get(env, self.adaptive)
        view.determinism = Determinism([p for p in self.determinism.pairs if p.a.environment_id == env])
        return view

    def views(self) -> list[Group]:
        """What tables show and comparisons compare: one view per environment it ran in."""
        return [self.in_environment(env) for env in self.environments] if self.split else [self]

    @property
    def id(self) -> str:
        return stable_hash([self.sweep, self.model, self.category, self.role, self.config_id], 12)

    @property
    def seeds(self) -> list[int]:
        return sorted({r.seed for r in self.ok})

    @property
    def data_sha256(self) -> list[str]:
        """The content hashes of the images its runs read: one, unless the data changed."""
        return sorted({r.data_sha256 for r in self.ok if r.data_sha256})

    @property
    def selection(self) -> dict[str, Any] | None:
        """How a search chose this configuration (best-config groups only)."""
        return next((r.selection for r in (*self.ok, *self.failed) if r.selection), None)

    @property
    def seeds_plan(self) -> SeedsPlan | None:
        """An adaptive study's rounds, as its latest run recorded them."""
        runs = sorted((*self.ok, *self.failed), key=lambda r: r.finished_at, reverse=True)
        return next((r.seeds_plan for r in runs if r.seeds_plan), None)

    @property
    def note(self) -> str | None:
        if not self.ok:
            return "no successful run"
        if len(self.data_sha256) > 1:
            return f"the images changed during the study: {len(self.data_sha256)} versions (data.sha256)"
        return "single seed: no spread to report" if len(self.seeds) == 1 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "sweep": self.sweep,
            "model": self.model,
            "category": self.category,
            "role": self.role,
            "config_id": self.config_id,
            "n_runs": len(self.ok),
            "seeds": self.seeds,
            "repeats": max(Counter((r.seed, r.environment_id) for r in self.ok).values(), default=0),
            "data_sha256": self.data_sha256,
            "environment_ids": self.environments,
            "note": self.note,
            "failed": [
                {"run_id": r.run_id, "seed": r.seed, "repeat": r.repeat, "error": r.error, "path": r.path}
                for r in self.failed
            ],
            "metrics": {m: s.to_json() for m, s in self.stats.items()},
            "determinism": self.determinism.to_json(),
            "cross_environment": [c.to_json() for c in self.cross_environment],
            "metrics_by_environment": {
                env: {m: s.to_json() for m, s in stats.items() if m in QUALITY} for env, stats in self.env_stats.items()
            },
            "adaptive": self.adaptive,
            "adaptive_by_environment": self.env_adaptive,
        }


@dataclass
class Comparison:
    category: str
    metric: str
    a: Group
    b: Group
    p: float
    ci_low: float
    ci_high: float
    detect: float = DEFAULT_DETECT  # the difference `seeds_needed` is for (--detect)
    seeds_needed: int | None = None

    @property
    def pooled_std(self) -> float | None:
        return pooled_std(self.a.stats[self.metric].values, self.b.stats[self.metric].values)

    @property
    def seeds_needed_note(self) -> str | None:
        """Why ``seeds_needed`` is None."""
        if self.seeds_needed is not None:
            return None
        pooled = self.pooled_std
        if pooled is None or not (math.isfinite(pooled) and pooled > 0):
            return "no spread to size it by"
        return f"more than {SEEDS_NEEDED_CAP}"

    @property
    def environment(self) -> str | None:
        """The environment both sides ran in, when each ran in one and the same."""
        envs = {r.environment_id for r in (*self.a.ok, *self.b.ok)}
        return envs.pop() if len(envs) == 1 else None

    @property
    def verdict(self) -> str:
        return comparison_verdict(
            self.p, self.ci_low, self.ci_high, self.a.stats[self.metric].n, self.b.stats[self.metric].n
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "metric": self.metric,
            "a": self.a.label,
            "b": self.b.label,
            "environment": self.environment,
            "n_a": self.a.stats[self.metric].n,
            "n_b": self.b.stats[self.metric].n,
            "p_a_better": self.p,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "verdict": self.verdict,
            "detect": self.detect,
            "pooled_std": self.pooled_std,
            "seeds_needed": self.seeds_needed,
            "seeds_needed_note": self.seeds_needed_note,
        }


_SELECTION_FIELDS = {
    "metric": "metric",
    "mode": "mode",
    "val_score": "value",
    "trial_run_id": "trial_run_id",
    "config": "config",
    "rule": "rule",
}


@dataclass
class Search:
    """One HPO search (a sweep's trials for one model and category, in one environment) and
    what it selected."""

    sweep: str
    model: str
    category: str
    environment: str | None  # None: a best-config group with no trials stored beside it
    trials: list[Run]
    best: list[Group]  # best-config groups it led to (more than one if a rerun chose again)

    @property
    def variant(self) -> str | None:
        return next((r.variant for r in self.trials), None)

    @property
    def winner(self) -> dict[str, Any] | None:
        """The configuration the search selected (its latest best-config group's)."""
        return (self.best[-1].selection or {}).get("config") if self.best else None

    @property
    def counts(self) -> dict[str, int]:
        ok = [t for t in self.trials if t.status == "ok"]
        return {
            "n_trials": len(self.trials),
            "n_ok": len(ok),
            "n_failed": len(self.trials) - len(ok),
            "n_stopped_early": sum(t.stopped_early for t in ok),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "sweep": self.sweep,
            "model": self.model,
            "category": self.category,
            "environment": self.environment,
            "variant": self.variant,
            **self.counts,
            "selections": [
                {"group": g.label} | {key: (g.selection or {}).get(field) for key, field in _SELECTION_FIELDS.items()}
                for g in self.best
            ],
        }


@dataclass
class CheckReport:
    """The checker's answer; ``to_json`` is the documented ``--json`` document."""

    store: Store
    tolerance: float
    groups: list[Group]
    comparisons: list[Comparison]
    searches: list[Search]
    detect: float = DEFAULT_DETECT
    aggregates: list[Aggregate] = field(default_factory=list)  # per label and metric, over categories
    across: list[AcrossComparison] = field(default_factory=list)  # P(A>B) over categories
    sources: list[SourceShare] = field(default_factory=list)  # variance by source (sources studies)

    @property
    def views(self) -> list[Group]:
        """Each group, or each group in each environment it ran in (``Group.views``)."""
        return [v for g in self.groups for v in g.views()]

    @property
    def environments(self) -> dict[str, Run]:
        """Each environment of the checked runs, with one of its runs (to name it by)."""
        runs = [r for g in self.groups for r in g.ok]
        first = {r.environment_id: r for r in reversed(runs)}
        return {env: first[env] for env in environment_order(runs)}

    def search_winners(self) -> list[tuple[tuple[str, str, str], list[Search]]]:
        """Searches of one sweep, model and category made in more than one environment."""
        by_key: dict[tuple[str, str, str], list[Search]] = defaultdict(list)
        for s in self.searches:
            if s.environment is not None and s.best:
                by_key[(s.sweep, s.model, s.category)].append(s)
        return [(k, v) for k, v in by_key.items() if len(v) > 1]

    @staticmethod
    def same_winner(searches: list[Search]) -> bool:
        return len({stable_hash(s.winner) for s in searches}) == 1

    def across_environments(self) -> dict[str, Any]:
        """The environments, and whether each search's winner holds in all of them (whether a
        comparison holds: ``comparisons`` with their ``environment``)."""
        return {
            "environments": [
                {"environment_id": env, "variant": r.variant, "machine_id": r.machine_id}
                for env, r in self.environments.items()
            ],
            "search_winners": [
                {
                    "sweep": sweep,
                    "model": model,
                    "category": category,
                    "same_winner": self.same_winner(searches),
                    "winners": [
                        {"environment": s.environment, "variant": s.variant, "config": s.winner} for s in searches
                    ],
                }
                for (sweep, model, category), searches in self.search_winners()
            ],
        }

    @property
    def diverged(self) -> list[Group]:
        return [g for g in self.groups if g.determinism.verdict == "diverged"]

    @property
    def strict_failure(self) -> str | None:
        """Why ``--strict`` fails: a same-seed repeat diverged, or a record is corrupt."""
        if self.store.corrupt:
            return f"{len(self.store.corrupt)} corrupt records"
        return f"{len(self.diverged)} groups diverged" if self.diverged else None

    def counts(self) -> dict[str, int]:
        runs = self.store.runs
        return {
            "files": self.store.n_files,
            "ok": sum(r.status == "ok" and r.role != "trial" for r in runs),
            "failed": sum(r.status == "failed" and r.role != "trial" for r in runs),
            "trials": sum(r.role == "trial" for r in runs),
            "malformed": len(self.store.malformed),
            "corrupt": len(self.store.corrupt),
        }

    def determinism_counts(self) -> dict[str, int]:
        """Groups per determinism verdict."""
        return {v: sum(g.determinism.verdict == v for g in self.groups) for v in (*VERDICTS, "untested")}

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": CHECK_SCHEMA,
            "tolerance": self.tolerance,
            "detect": self.detect,
            "records": self.counts(),
            "malformed": [{"path": p, "error": e} for p, e in self.store.malformed],
            "corrupt": [{"path": p, "error": e} for p, e in self.store.corrupt],
            "determinism": self.determinism_counts(),
            "groups": [g.to_json() for g in self.groups],
            "comparisons": [c.to_json() for c in self.comparisons],
            "searches": [s.to_json() for s in self.searches],
            "across_environments": self.across_environments(),
            "aggregates": {
                "models": [a.to_json() for a in self.aggregates],
                "comparisons": [c.to_json() for c in self.across],
            },
            "sources": [s.to_json() for s in self.sources],
        }

    def json_text(self) -> str:
        """What ``harness check --json`` prints: sorted keys, indented (msgspec writes 7 MB of
        it in a tenth of json.dumps' time)."""
        return msgspec.json.format(msgspec.json.encode(self.to_json(), order="sorted"), indent=2).decode() + "\n"


def _label(run: Run, config_id: str, several: bool, pins: dict[str, Any]) -> str:
    """``sweep/model``, `` [best]`` for a search's winner, ``#id`` where a sweep has several
    configurations (beyond their streams), and which streams are pinned (``sources``)."""
    label = f"{run.sweep}/{run.model}" + (" [best]" if run.role == "best" else "")
    return (f"{label} #{config_id[:6]}" if several else label) + stream_tag(pins)


def _groups(store: Store) -> list[Group]:
    members: dict[tuple[str, str, str, str, str], list[Run]] = defaultdict(list)
    for run in store.runs:
        if run.role != "trial":
            members[(run.sweep, run.model, run.category, run.role, run.config_id)].append(run)
    pins = {key[4]: pins_of(store.params[key[4]]) for key in members}
    base = {c: base_config(store.params[c]) if p else c for c, p in pins.items()}
    configs: dict[tuple[str, str, str, str], set[str]] = defaultdict(set)
    for sweep, model, category, role, config in members:
        configs[(sweep, model, category, role)].add(base[config])
    groups = []
    for key, runs in sorted(members.items()):
        runs.sort(key=lambda r: (r.seed, r.repeat, r.environment_id, r.run_id))
        label = _label(runs[0], base[key[4]], len(configs[key[:4]]) > 1, pins[key[4]])
        ok = [r for r in runs if r.status == "ok"]
        groups.append(Group(*key, label, ok, [r for r in runs if r.status == "failed"]))
    return sorted(groups, key=lambda g: (g.category, g.label))


def _seed_stats(runs: list[Run], metrics: tuple[str, ...] = (*QUALITY, *COST)) -> dict[str, Stat]:
    per_seed: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for m, v in run.metrics.items():
            per_seed[m][run.seed].append(v)
    stats = {}
    for m in metrics:
        if m in per_seed:
            by_seed = sorted(per_seed[m].items())
            stats[m] = Stat(np.array([seed_mean(v) for _, v in by_seed]), np.array([s for s, _ in by_seed]))
    return stats


def _adaptive(groups: list[Group]) -> None:
    """Where each group of an adaptive seed study stands in its rounds, in each environment
    it ran in (the driver's groups are an environment's): as the driver would decide it."""
    for g in groups:
        plan = g.seeds_plan
        if plan is None:
            continue
        if g.env_stats:
            g.env_adaptive = {env: _status(stats, plan) for env, stats in g.env_stats.items()}
        else:
            g.adaptive = _status(g.stats, plan)


def _status(stats: dict[str, Stat], plan: SeedsPlan) -> dict[str, Any]:
    st = stats.get(plan.metric)
    values = {} if st is None else dict(zip(st.seeds.tolist(), st.values.tolist(), strict=True))
    return adaptive_status(values, plan)


def _comparable(a: Group, b: Group) -> bool:
    """Views of two groups are compared unless one group ran in several environments and the
    other view is from another one: then each environment's views are compared among
    themselves, so a model is not credited with what its environment did."""
    if a.base_label and a.base_label == b.base_label:  # one group in two environments
        return False
    if not (a.base_label or b.base_label):  # two groups of one environment each
        return True
    return a.environments == b.environments


def _comparisons(views: list[Group], memo: Memo, detect: float) -> list[Comparison]:
    """Pairs of views (groups, or a group in one environment) of a category that saw the same
    data, per compared metric, each with the seeds a side it would need to detect ``detect``.

    Every pair while a category has up to ALL_PAIRS_UP_TO views; beyond that, each view against
    the best by mean image AUROC (the question a long list asks: which are tied with it).
    """
    by_data: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for g in views:
        if g.ok and len(g.data_sha256) == 1:  # unknown or changed data: nothing to compare with
            by_data[(g.category, g.data_sha256[0])].append(g)
    todo: list[tuple[str, str, Group, Group]] = []
    for (category, _), members in sorted(by_data.items()):
        if len(members) <= ALL_PAIRS_UP_TO:
            pairs = list(combinations(members, 2))
        else:
            best = max(members, key=lambda g: g.stats["image_AUROC"].mean if "image_AUROC" in g.stats else -math.inf)
            pairs = [(best, g) for g in members if g is not best]
        pairs = [(a, b) for a, b in pairs if _comparable(a, b)]
        todo += [(category, m, a, b) for a, b in pairs for m in COMPARED if m in a.stats and m in b.stats]
    results = remembered_improvement(memo, [(a.stats[m].values, b.stats[m].values) for _, m, a, b in todo])
    out = [Comparison(c, m, a, b, *res, detect=detect) for (c, m, a, b), res in zip(todo, results, strict=True)]
    sized = [(c, std) for c in out if (std := c.pooled_std) is not None and math.isfinite(std) and std > 0]
    for (c, _), n in zip(sized, remembered_seeds_needed(memo, [detect / std for _, std in sized]), strict=True):
        c.seeds_needed = n
    return out


def _across(views: list[Group], memo: Memo) -> tuple[list[Aggregate], list[AcrossComparison]]:
    """Per label (as the stability table's mean row) and compared metric with two categories or
    more: the aggregates over categories and seeds; and per pair of such labels, P(A>B) over
    the categories where their views can be compared (the same data, ``_comparable``), two or
    more. Pairs as in a category: every pair up to ALL_PAIRS_UP_TO labels, else each against
    the best by the metric's mean over categories."""
    by_label: dict[str, dict[str, Group]] = defaultdict(dict)
    for g in views:
        if g.ok:
            by_label[g.label][g.category] = g
    aggs = []
    for label, cats in sorted(by_label.items()):
        for m in COMPARED:
            have = sorted(c for c, g in cats.items() if m in g.stats)
            if len(have) > 1:
                aggs.append(Aggregate(label, m, have, [cats[c].stats[m].values for c in have]))
    for agg, estimates in zip(aggs, remembered_aggregates(memo, [a.values for a in aggs]), strict=True):
        agg.estimates = estimates
    todo: list[tuple[Aggregate, Aggregate, list[str]]] = []
    for m in COMPARED:
        mine = [a for a in aggs if a.metric == m]
        if len(mine) <= ALL_PAIRS_UP_TO:
            pairs = list(combinations(mine, 2))
        else:
            best = max(mine, key=lambda a: a.estimates[0])
            pairs = [(best, a) for a in mine if a is not best]
        for a, b in pairs:
            ga, gb = by_label[a.label], by_label[b.label]
            shared = [
                c
                for c in a.categories
                if c in b.categories
                and len(ga[c].data_sha256) == 1
                and ga[c].data_sha256 == gb[c].data_sha256
                and _comparable(ga[c], gb[c])
            ]
            if len(shared) > 1:
                todo.append((a, b, shared))
    results = remembered_improvement_across(memo, [[(a.of(c), b.of(c)) for c in cats] for a, b, cats in todo])
    across = [AcrossComparison(a.metric, a, b, cats, *res) for (a, b, cats), res in zip(todo, results, strict=True)]
    return aggs, across


def remembered_means(memo: Memo, stats: Iterable[Stat]) -> None:
    """``bootstrap_means``, computed only for values the memo has no interval for."""
    todo = []
    for s in stats:
        if s.n < 2:
            continue
        key = memo.key(b"bca-mean", s.values.tobytes())
        hit = memo.get(key)
        if hit is None:
            todo.append((key, s))
        else:
            s.ci_low, s.ci_high = hit
    if todo:  # (computing imports scipy: a second a process)
        bootstrap_means(s for _, s in todo)
    for key, s in todo:
        memo.put(key, [s.ci_low, s.ci_high])


def remembered_improvement(memo: Memo, pairs: list[tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, float, float]]:
    """``probability_of_improvement``, computed only for pairs the memo has no answer for
    (a pair's answer never depends on the others)."""
    keys = [memo.key(b"p-improvement", a.tobytes(), b.tobytes()) for a, b in pairs]
    found = memo.each(keys, lambda missing: probability_of_improvement([pairs[i] for i in missing]))
    return [(float(h[0]), float(h[1]), float(h[2])) for h in found]  # type: ignore[arg-type]


def remembered_aggregates(memo: Memo, rows: list[list[np.ndarray]]) -> list[Estimates]:
    """``across.aggregates`` (mean and IQM over categories), computed only for rows the memo lacks."""
    keys = [memo.key(b"across-aggregates", *(v.tobytes() for v in row)) for row in rows]
    found = memo.each(keys, lambda missing: aggregates([rows[i] for i in missing]))
    return [cast(Estimates, tuple(float(v) for v in h)) for h in found]  # type: ignore[arg-type]


def remembered_improvement_across(
    memo: Memo, pairs: list[list[tuple[np.ndarray, np.ndarray]]]
) -> list[tuple[float, float, float]]:
    """``across.improvement`` (P(A>B) over categories), computed only for pairs the memo lacks."""
    keys = [memo.key(b"across-improvement", *(v.tobytes() for ab in cats for v in ab)) for cats in pairs]
    found = memo.each(keys, lambda missing: improvement([pairs[i] for i in missing]))
    return [(float(h[0]), float(h[1]), float(h[2])) for h in found]  # type: ignore[arg-type]


_SearchKey = tuple[str, str, str, str | None]


def _searches(store: Store, groups: list[Group]) -> list[Search]:
    """Searches by sweep, model, category and environment (a study with environments searches
    in each); a best-config group belongs to the search of each environment it ran in, seen
    in that environment (its runs there, how they were selected, their statistics)."""
    trials: dict[_SearchKey, list[Run]] = defaultdict(list)
    for run in store.runs:
        if run.role == "trial":
            trials[(run.sweep, run.model, run.category, run.environment_id)].append(run)
    best: dict[_SearchKey, list[Group]] = defaultdict(list)
    for g in groups:
        if g.role == "best":
            envs = {r.environment_id for r in (*g.ok, *g.failed)}
            searched: list[str | None] = [e for e in envs if (g.sweep, g.model, g.category, e) in trials]
            for env in searched or [None]:  # its runs in that environment, and their statistics
                best[(g.sweep, g.model, g.category, env)].append(g if env is None else g.in_environment(env))
    order = {env: i for i, env in enumerate(environment_order(store.runs))}  # by the study's names
    keys = sorted(set(trials) | set(best), key=lambda k: (*k[:3], order.get(k[3] or "", -1)))
    return [Search(*key, trials.get(key, []), best.get(key, [])) for key in keys]


def check(
    root: Path | list[Path], tolerance: float = DEFAULT_TOLERANCE, sweep: str = "*", detect: float = DEFAULT_DETECT
) -> CheckReport:
    """Read the store at ``root`` (or several, lined up as one; one sweep of them, or all) and
    compute every verdict; ``detect``: the difference each comparison sizes its seeds for."""
    roots = _roots(root, tolerance, detect)
    with gc_paused():
        return _verdicts(_loaded(roots, sweep), tolerance, detect)


def check_output(
    root: Path | list[Path], tolerance: float, sweep: str, detect: float, render: Callable[[CheckReport], str]
) -> tuple[Store, str, str | None]:
    """``render(check(...))`` and the report's ``strict_failure``, with the store they came
    from; remembered (``RESULTS/.index/check-output.bin``, the last answer) by the records'
    contents, the arguments and the code, so a rerun over unchanged records computes nothing."""
    roots = _roots(root, tolerance, detect)
    with gc_paused():
        store = _loaded(roots, sweep)
        code = code_hash(*(f"check/{m}.py" for m in _OUTPUT_MODULES), "formatting.py", "record.py")
        args = msgspec.json.encode([tolerance, sweep, detect, render.__qualname__, [str(r) for r in roots]])
        key = Memo.key(b"check-output", args, store.contents.encode())
        path = roots[0] / MEMO_DIR / "check-output.bin"
        cached = read_framed(path, code, _OUTPUT)
        if cached is not None and cached[0] == key:
            return store, cached[1], cached[2]
        report = _verdicts(store, tolerance, detect)
        text, strict = render(report), report.strict_failure
        write_framed(path, code, msgspec.msgpack.encode((key, text, strict)))
        return store, text, strict


_OUTPUT_MODULES = (
    "groups",
    "summary",
    "pairs",
    "stats",
    "load",
    "index",
    "memo",
    "verify",
    "power",
    "across",
    "sources",
    "adaptive",
)
_OUTPUT = msgspec.msgpack.Decoder(tuple[str, str, str | None])


def _roots(root: Path | list[Path], tolerance: float, detect: float) -> list[Path]:
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise HarnessError(f"--tolerance must be a finite number >= 0, got {tolerance}")
    if not (detect > 0 and math.isfinite(detect)):
        raise HarnessError(f"--detect must be a finite number > 0, got {detect}")
    return root if isinstance(root, list) else [root]


def _loaded(roots: list[Path], sweep: str) -> Store:
    store = load_stores(roots, sweep)
    if not store.runs:
        path, error = (store.malformed + store.corrupt)[0]
        bad = f"{len(store.malformed)} malformed, {len(store.corrupt)} corrupt"
        raise HarnessError(f"no readable run record in {store.where}: {bad}, such as {path}: {error}")
    return store


def _verdicts(store: Store, tolerance: float, detect: float) -> CheckReport:
    groups = _groups(store)
    for g in groups:
        g.stats = _seed_stats(g.ok)
        envs = g.environments
        if len(envs) > 1:
            g.env_stats = {env: _seed_stats([r for r in g.ok if r.environment_id == env]) for env in envs}
    # Per environment, only quality metrics get an interval: the cost columns show means.
    per_env = (st[m] for g in groups for st in g.env_stats.values() for m in QUALITY if m in st)
    seeded = [*(s for g in groups for s in g.stats.values()), *per_env]
    remembered_means(store.memo, seeded)
    remembered_mdd(store.memo, seeded)
    several = {g.label for g in groups if g.env_stats}  # labels shown per environment
    _adaptive(groups)
    for g in groups:
        g.split = g.label in several
        g.determinism = determinism(g.ok, store, tolerance)
        std = g.stats["image_AUROC"].std if "image_AUROC" in g.stats else None
        g.cross_environment = cross_environment(g.ok, std, store, tolerance)
    views = [v for g in groups for v in g.views()]
    sources = shares(views, store)
    # A source study's groups, its reference too, measure where the spread comes from: not compared.
    studied = {(s.sweep, s.model, s.category, s.label) for s in sources}
    models = [
        v
        for v in views
        if only_source(pins_of(store.params[v.config_id])) is None
        and (v.sweep, v.model, v.category, v.label) not in studied
    ]
    comparisons = _comparisons(models, store.memo, detect)
    aggs, across = _across(models, store.memo)
    report = CheckReport(store, tolerance, groups, comparisons, _searches(store, groups), detect, aggs, across, sources)
    store.memo.save()
    return report
