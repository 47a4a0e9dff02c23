"""The report's "to reproduce" block: ``harness run`` loops over exactly the stored runs.

Every recorded setting is spelt out, so defaults changing in a later harness cannot bite.
"""

from __future__ import annotations

import json
import shlex
from collections import defaultdict
from typing import Any

from harness.check import Run, Store
from harness.check.load import CONTENT_HASHES
from harness.formatting import flatten
from harness.record import load_time_env


def _value(v: Any) -> str:
    """A ``--set`` value as YAML reads it back: strings bare, the rest as JSON."""
    return v if isinstance(v, str) else json.dumps(v)


def run_command(run: Run, params: dict[str, Any], env: dict[str, Any]) -> str:
    """The `harness run` line of one configuration (category, seed and repeat left to the loop)."""
    device = "cuda" if str(env.get("device", "cpu")).startswith("cuda") else "cpu"
    settings = {
        k: v
        for k, v in flatten(params).items()
        if k not in {f"{group}.{key}" for group, key in CONTENT_HASHES.items()}  # hashes, not settings
    }
    sets = [f"name={run.sweep}", f"resources.cpu={env.get('threads')}"]
    sets += [f"{k}={_value(v)}" for k, v in sorted(settings.items())]
    requested = env.get("requested") or {}
    if run.variant:  # the study's environment, as asked for (torch checks it is what it gets)
        variant = {f"environments.{run.variant}.{k}": v for k, v in sorted(requested.items())}
        sets += [f"{k}={_value(v)}" for k, v in variant.items()] or [f"environments.{run.variant}={{}}"]
    load_time = "".join(f"{k}={shlex.quote(v)} " for k, v in load_time_env(requested).items())
    head = f"{load_time}harness run --model {run.model} --data-root {shlex.quote(run.data_root)}"
    head += f' --category "$c" --seed $s --repeat $r --device {device}'
    note = ""
    if run.role == "best":
        note = f"# the configuration {run.sweep}'s search selected (a rerun by hand is stored with role run)\n  "
    if settings.get("model_args.weights"):
        note += "# model_args.weights is the recorded file name: give its path on your machine\n  "
    return note + head + "".join(f" \\\n      --set {shlex.quote(s)}" for s in sets)


def reproduce_commands(store: Store) -> list[str]:
    """Shell loops, one per sweep, model and configuration, over the categories, seeds and
    repeats that were stored (a full grid as nested loops, else each seed:repeat named)."""
    commands: dict[tuple[str, str, str, str, str, str], str] = {}
    points: dict[str, dict[str, set[tuple[int, int]]]] = defaultdict(lambda: defaultdict(set))
    for r in store.runs:
        if r.role == "trial":
            continue
        key = (r.sweep, r.model, r.config_id, r.env_id, r.data_root, r.role)
        if key not in commands:
            commands[key] = run_command(r, store.params[r.config_id], store.envs[r.env_id])
        points[commands[key]][r.category].add((r.seed, r.repeat))
    out = []
    for command, by_category in sorted(points.items()):
        same_points: dict[frozenset[tuple[int, int]], list[str]] = defaultdict(list)
        for category, runs in by_category.items():
            same_points[frozenset(runs)].append(category)
        for pairs, categories in sorted(same_points.items(), key=lambda kv: sorted(kv[1])):
            seeds, repeats = sorted({s for s, _ in pairs}), sorted({r for _, r in pairs})
            cats = " ".join(shlex.quote(c) for c in sorted(categories))  # a name may hold $ or spaces
            if len(pairs) == len(seeds) * len(repeats):
                head = f"for s in {' '.join(map(str, seeds))}; do for r in {' '.join(map(str, repeats))}; do"
            else:  # not a full grid: name each seed and repeat
                sr = " ".join(f"{s}:{r}" for s, r in sorted(pairs))
                head = f"for sr in {sr}; do s=${{sr%:*}} r=${{sr#*:}}"
            out += [f"for c in {cats}; do {head}", f"  {command}", "done; " * head.count("do") + "done"]
    commits = sorted({str(e.get("harness_commit")) for e in store.envs.values()})
    return [f"# at harness commit {', '.join(commits)}", *out]
