"""Try the harness on a multi-host Ray cluster made on this machine, then tear it down.

Each host is a Linux network namespace with its own address (tests/netns.py, the cluster the
tests use): a Ray head, worker hosts with one CPU each, and a client host that submits a small
PatchCore seed study with `ray job submit`, as you would from your laptop. Ray's token auth is
on. The data set and the results directory are on this machine's file system, which every
host sees (as a shared volume). Needs root (namespaces) and nothing else: no network, no
Docker, no GPU, no pretrained weights.

    sudo .venv/bin/python benchmarks/netns_cluster.py                 # 2 workers, 2 categories x 4 seeds
    sudo .venv/bin/python benchmarks/netns_cluster.py --workers 3 --seeds 6 --out /tmp/try-netns

It prints the hosts, the study's progress lines, the job's status and `harness check`'s table,
with the time the cluster took to start, the study, and the teardown. The data, spec and
results stay in --out (default: a new directory under /tmp).
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # tests/netns.py, shared with the tests

from tests.netns import BIN, TERMINAL, NetnsCluster, short_tmp, unavailable  # noqa: E402

BASE_SPEC = REPO / "harness" / "demo_specs" / "patchcore.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=2, help="worker hosts, one CPU each (2)")
    p.add_argument("--categories", default="weave,disc", help="synthetic categories (weave,disc)")
    p.add_argument("--seeds", type=int, default=4, help="seeds per category, one run each (4)")
    p.add_argument("--out", type=Path, help="where data, spec and results go (default: a new /tmp dir)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds the study may take (1800)")
    return p.parse_args(argv)


def write_spec(path: Path, data: Path, categories: list[str], seeds: int) -> str:
    """The demo's PatchCore study (64 px, random-init backbone: no weights to fetch), resized."""
    doc = yaml.safe_load(BASE_SPEC.read_text())
    doc.update(name="netns-patchcore", seeds=list(range(seeds)), repeats=1)
    doc["data"].update(root=str(data), categories=categories)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(doc["name"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    why = unavailable()
    if why is not None:
        print(f"cannot make the cluster here: {why}", file=sys.stderr)
        return 2
    work = (args.out or short_tmp("adh-try")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data, results, spec = work / "data", work / "results", work / "netns_patchcore.yaml"
    categories = args.categories.split(",")
    synth = [str(BIN / "harness"), "data", "synth", str(data), "--categories", args.categories]
    print(f"$ {shlex.join(synth)}", flush=True)
    subprocess.run(synth, check=True)
    name = write_spec(spec, data, categories, args.seeds)
    runs = len(categories) * args.seeds

    t0 = time.monotonic()
    cluster = NetnsCluster(workers=args.workers)
    with cluster:
        started = time.monotonic() - t0
        print(f"\ncluster up in {started:.1f} s (token auth on), one network namespace per host:")
        alive = cluster.alive()
        for host in cluster.hosts.values():
            node = f"Ray node {alive[host.name][:8]}" if host.name in alive else "no Ray node"
            print(f"  {host.name:<7} {host.netns:<20} {host.address:<14} {node}")
        entrypoint = ["harness", "sweep", str(spec), "--address", "auto", "--results", str(results)]
        submit = ["ray", "job", "submit", "--address", cluster.dashboard_url, "--", *entrypoint]
        print(f"\nfrom the client host, {runs} runs on {args.workers} worker hosts:")
        print(f"$ ip netns exec {cluster.hosts['client'].netns} {shlex.join(submit)}", flush=True)
        t1 = time.monotonic()
        job = cluster.submit(entrypoint)
        status, shown = cluster.status(job), 0
        while status not in TERMINAL and time.monotonic() - t1 < args.timeout:
            time.sleep(2)
            status = cluster.status(job)
            lines = cluster.logs(job).splitlines()
            for line in lines[shown:]:
                print(f"  | {line}", flush=True)
            shown = len(lines)
        if status not in TERMINAL:
            cluster.stop_job(job)
        study = time.monotonic() - t1
        print(f"job {job}: {status} in {study:.1f} s")
        t2 = time.monotonic()
    teardown = time.monotonic() - t2
    left = cluster.leftovers()
    print(f"teardown in {teardown:.1f} s; left behind: {', '.join(left) if left else 'nothing'}")
    print(f"\ncluster start {started:.1f} s, study {study:.1f} s ({runs} runs), teardown {teardown:.1f} s\n")
    check = [str(BIN / "harness"), "check", str(results), "--sweep", name]
    print(f"$ {shlex.join(check)}", flush=True)
    subprocess.run(check, check=False)
    print(f"\ndata, spec and results: {work}")
    return 0 if status == "SUCCEEDED" and not left else 1


if __name__ == "__main__":
    sys.exit(main())
