"""An adaptive seed study (``seeds: {adaptive: ...}``): seeds added in rounds, per group, until
its CI is narrow enough or it reaches the maximum.

Every decision is taken from the stored records (``harness.check.adaptive.next_step``), so a
rerun of a killed study re-derives the rounds it made and goes on from the first one that is
not complete; the runs themselves go through ``run_grid``, which skips what is stored.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from harness.check.adaptive import Step, next_step
from harness.check.load import settings_id
from harness.check.stats import seed_mean
from harness.record import SeedsPlan
from harness.spec import Device, ExperimentSpec, RunSpec, environment_names, expand, run_spec
from harness.store import ResultsStore
from harness.sweep.progress import Progress
from harness.sweep.tasks import environments_of, stored_ok

GroupKey = tuple[str | None, str]  # (environment name, category): a group of the study's runs


def seed_values(
    store: ResultsStore, spec: ExperimentSpec, plan: SeedsPlan, environments: dict[str | None, str | None]
) -> dict[GroupKey, dict[int, float]]:
    """Per group, each seed's value of the plan's metric over the study's stored ``ok`` runs of
    this configuration in the environment its variant has on this cluster (``environments``,
    see ``environments_of``: another machine's runs under the variant's name are its own
    study, as the checker groups them), a seed's repeats reduced as the checker does."""
    config = settings_id(run_spec(spec, spec.data.categories[0], 0, 0).params())[0]  # every category's
    per: dict[GroupKey, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in stored_ok(store, spec.name, "run", Progress(0)).values():
        value = r.metrics.get(plan.metric)
        here = r.environment_id == environments.get(r.variant)
        if value is not None and here and r.model == spec.model and settings_id(r.params)[0] == config:
            per[(r.variant, r.category)][r.seed].append(value)
    return {g: {s: seed_mean(v) for s, v in seeds.items()} for g, seeds in per.items()}


def group_name(group: GroupKey) -> str:
    env, category = group
    return f"{category} in {env}" if env else category


def round_line(steps: dict[GroupKey, Step], stopped: set[GroupKey], plan: SeedsPlan) -> str:
    """One line per round: each group's half-width and whether it goes on (to how many seeds)."""
    parts = []
    for group, step in steps.items():
        width = "-" if step.halfwidth is None else f"{step.halfwidth:.4f}"
        if group in stopped:
            what = f"stopped at {step.seeds} seeds: runs of its round failed or were lost (a rerun retries them)"
        elif step.due:
            what = f"runs to {step.seeds} seeds (CI half-width {width}, target {plan.ci_halfwidth:g})"
        else:
            what = f"{step.outcome} at {step.seeds} seeds (CI half-width {width})"
        parts.append(f"{group_name(group)} {what}")
    return f"adaptive seeds ({plan.metric}): " + "; ".join(parts)


def run_rounds(
    spec: ExperimentSpec, plan: SeedsPlan, store: ResultsStore, device: Device, run: Callable[[list[RunSpec]], None]
) -> None:
    """Round after round, each due group's seeds up to its round's size, until none is due.

    A group whose round has nothing left to send (its runs ran in this sweep and failed or
    were lost) stops: a failing group is not retried in a loop; a rerun retries it.
    """
    grid = expand(spec, device, seeds=range(plan.max))
    environments = environments_of(grid, spec)
    groups = [(env, category) for env in environment_names(spec) for category in spec.data.categories]
    sent: dict[GroupKey, set[int]] = defaultdict(set)  # seeds given to run_grid in this sweep
    stopped: set[GroupKey] = set()
    while True:
        values = seed_values(store, spec, plan, environments)
        steps = {g: next_step(values.get(g, {}), plan) for g in groups}
        todo = [
            r
            for r in grid
            if (g := (r.environment_name, r.category)) not in stopped
            and steps[g].due
            and r.seed < steps[g].seeds
            and r.seed not in sent[g]
        ]
        stopped |= {g for g in groups if steps[g].due and not any((r.environment_name, r.category) == g for r in todo)}
        print(round_line(steps, stopped, plan), flush=True)
        if not todo:
            return
        for r in todo:
            sent[(r.environment_name, r.category)].add(r.seed)
        run(todo)
