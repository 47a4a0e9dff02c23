"""infra/ checked where no Docker engine, Kubernetes or cloud is: every file parses, real
validators pass (hadolint, kubernetes-validate, Ray's own cluster-config schema), and the
files agree with the code and with each other (versions, commands, ports, paths, variables)."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from harness.cli import build_parser
from harness.spec import load_spec

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGE = f"ad-harness:{PYPROJECT['project']['version']}"
# What every way of running a cluster must agree on.
PORTS = {"gcs": 6379, "dashboard": 8265}
DATA, RESULTS = "/data", "/results"
ENV = {"RAY_AUTH_MODE", "HF_HUB_OFFLINE", "WANDB_MODE"}
K8S_VERSION = "1.37.0"


# --- Dockerfile --------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (INFRA / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def arg_default(name: str) -> str:
    (value,) = [rest.split("=", 1)[1] for word, rest in dockerfile() if word == "ARG" and rest.startswith(f"{name}=")]
    return value


def env_keys() -> set[str]:
    keys: set[str] = set()
    for word, rest in dockerfile():
        if word == "ENV":
            keys |= {kv.split("=", 1)[0] for kv in shlex.split(rest)}
    return keys


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    out = subprocess.run([str(hadolint), str(INFRA / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_image_versions_match_the_pinned_environment() -> None:
    import torch

    # The default base is CUDA's, the torch build's CUDA (major.minor), Python the project's
    # (a standalone build by default; PYTHON=system takes a Debian base's, tests/test_image.py).
    cuda = re.fullmatch(r"nvidia/cuda:(\d+\.\d+)\.\d+-base-ubuntu\d+\.\d+", arg_default("BASE_IMAGE"))
    assert cuda is not None
    assert cuda.group(1) == torch.version.cuda
    assert arg_default("PYTHON") == "uv"
    python = arg_default("PYTHON_VERSION")
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(python)
    assert python.startswith(f"{sys.version_info.major}.{sys.version_info.minor}.")  # as tested here


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_lock_pins_every_package_and_agrees_with_pyproject() -> None:
    lines = [ln for ln in (INFRA / "requirements.lock").read_text().splitlines() if ln and not ln.startswith("#")]
    pins = {}
    for line in lines:
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", line
        pins[_name(req.name)] = spec.version
    for dep in PYPROJECT["project"]["dependencies"]:
        req = Requirement(dep)
        assert _name(req.name) in pins, f"{req.name} is not in infra/requirements.lock"
        assert req.specifier.contains(pins[_name(req.name)]), f"{req.name}=={pins[_name(req.name)]} vs {dep}"
    # The whole tree: what each locked package requires (ray's tune and default extras included)
    # is locked too, since the image installs the lock with --no-deps.
    extras = {"ray": {"tune", "default"}}
    for name in pins:
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            wanted = [{"extra": e} for e in extras.get(name, set())] or [{"extra": ""}]
            if req.marker is None or any(req.marker.evaluate(env) for env in wanted):
                assert _name(req.name) in pins, f"{name} requires {req.name}, which is not locked"
    for name in ("torch", "torchvision", "anomalib", "ray", "wandb", "optuna"):  # as tested here
        assert pins[name] == importlib.metadata.version(name)


def test_image_is_non_root_and_bakes_no_secret_or_run_setting() -> None:
    users = [rest for word, rest in dockerfile() if word == "USER"]
    assert users == ["1000:1000"]
    keys = env_keys() | {rest.split("=", 1)[0] for word, rest in dockerfile() if word == "ARG"}
    assert not {k for k in keys if re.search(r"KEY|TOKEN|SECRET|PASSWORD", k)}
    assert not keys & {"WANDB_MODE", "HF_HUB_OFFLINE", "WANDB_API_KEY"}  # left to the environment
    env = dict(kv.split("=", 1) for word, rest in dockerfile() if word == "ENV" for kv in shlex.split(rest))
    assert env["HARNESS_RESULTS"] == RESULTS
    assert any(word == "VOLUME" and RESULTS in rest for word, rest in dockerfile())
    run = " ".join(rest for word, rest in dockerfile() if word == "RUN")
    assert f"mkdir -p {DATA} {RESULTS}" in run
    assert arg_default("BAKE_WEIGHTS") == "1"  # the configs run with HF_HUB_OFFLINE=1
    assert "rsync openssh-client" in run  # `ray up` syncs into the containers and ssh-es between them


def test_copied_paths_exist_and_pass_the_build_context_filter() -> None:
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert "*" in ignore  # everything else (results, data sets, .venv) stays out of the context
    for word, rest in dockerfile():
        if word == "COPY" and "--from=" not in rest:
            *sources, _dest = [a for a in shlex.split(rest) if not a.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is filtered out of the build context"


# --- commands: every entrypoint is a real command on a shipped spec ----------------------


def check_sweep_command(argv: list[str]) -> None:
    """Parse ``harness sweep ...`` with the real CLI, and load its spec with its overrides."""
    assert argv[:2] == ["harness", "sweep"], argv
    ns = build_parser().parse_args(argv[1:])
    spec_file = REPO / Path(ns.spec).relative_to("/app") if ns.spec.is_absolute() else REPO / ns.spec
    assert spec_file.is_file(), spec_file
    spec = load_spec(spec_file, ns.set)
    assert spec.data.root == DATA
    assert str(ns.results) == RESULTS
    assert ns.address is not None  # it joins the cluster, never starts a local one


def ray_start(argv: list[str]) -> dict[str, Any]:
    """``ray start`` arguments parsed by Ray's own command line: its options, by name."""
    from ray.scripts.scripts import start

    i = argv.index("start")
    assert argv[i - 1] == "ray"
    return dict(start.make_context("start", argv[i + 1 :]).params)


def interpolate(node: Any) -> Any:
    """Compose's ``${VAR:-default}`` / ``${VAR:?message}`` with no variable set: the defaults."""
    if isinstance(node, dict):
        return {k: interpolate(v) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v) for v in node]
    if not isinstance(node, str):
        return node
    pattern = r"\$\{(\w+)(?::-([^}]*)|:\?[^}]*)?\}"  # ${VAR}, ${VAR:-default}, ${VAR:?message}
    return re.sub(pattern, lambda m: f"<{m.group(1)}>" if m.group(2) is None else m.group(2), node)


def doc_commands(path: Path, section: str) -> list[list[str]]:
    """The shell commands of a docs page section's ```bash blocks, continuation lines joined."""
    text = path.read_text()
    body = text.split(f"\n{section}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip():
                commands.append(shlex.split(line, comments=True))
    return commands


def test_cluster_doc_commands_are_real_harness_and_ray_commands() -> None:
    harness = ray = 0
    for argv in doc_commands(REPO / "docs" / "cluster.md", "## Run on a cluster"):
        if "harness" in argv:
            sub = argv[argv.index("harness") :]
            if sub[1] == "sweep":
                check_sweep_command(sub)
            else:
                build_parser().parse_args(sub[1:])  # exits (a failed test) on a flag it does not know
            harness += 1
        if "ray" in argv and "start" in argv:
            ray_start(argv)
            ray += 1
    assert harness >= 5
    assert ray >= 2


# --- docker compose ----------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return dict(interpolate(yaml.safe_load((INFRA / "docker-compose.yml").read_text())))


def test_compose_has_a_head_and_gpu_workers() -> None:
    services = compose()["services"]
    assert set(services) == {"head", "worker"}
    for svc in services.values():
        assert svc["image"] == IMAGE
        assert svc["volumes"] == [f"<DATA_DIR>:{DATA}:ro", f"<RESULTS_DIR>:{RESULTS}"]
        assert set(svc["environment"]) >= ENV
        assert svc["environment"]["WANDB_API_KEY"] == ""  # from the host's shell, never written here
        assert svc["network_mode"] == "host"
    head = ray_start(services["head"]["command"])
    assert head["head"] is True
    assert (head["port"], head["dashboard_port"]) == (PORTS["gcs"], PORTS["dashboard"])
    assert head["dashboard_host"] == "127.0.0.1"  # the host's loopback unless asked otherwise
    assert head["num_gpus"] == 0
    worker = ray_start(services["worker"]["command"])
    assert worker["address"] == f"127.0.0.1:{PORTS['gcs']}"
    # Two Ray nodes on one host's network: the second agent needs its own port.
    assert worker["dashboard_agent_listen_port"] != head["dashboard_agent_listen_port"]
    (gpu,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}  # Ray shares them out
    assert "deploy" not in services["head"]


def test_compose_refuses_to_start_without_data_and_results_dirs() -> None:
    text = (INFRA / "docker-compose.yml").read_text()
    assert "${DATA_DIR:?" in text
    assert "${RESULTS_DIR:?" in text


# --- KubeRay -----------------------------------------------------------------------------


def kuberay(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((INFRA / "kuberay" / name).read_text()) if d]


def pod_templates(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster["spec"]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def validate_k8s(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def as_pod_template(template: dict[str, Any]) -> dict[str, Any]:
    """A KubeRay pod template as a core ``PodTemplate``, which Kubernetes' own schema checks."""
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def test_kuberay_manifests_pass_the_kubernetes_schema() -> None:
    for doc in kuberay("storage.yaml"):
        validate_k8s(doc)
    (cluster,) = kuberay("raycluster.yaml")
    (job,) = kuberay("rayjob.yaml")
    for template in [*pod_templates(cluster), job["spec"]["submitterPodTemplate"]]:
        validate_k8s(as_pod_template(template))


def test_the_schema_check_would_catch_a_misspelt_field() -> None:
    (cluster,) = kuberay("raycluster.yaml")
    template = pod_templates(cluster)[0]
    template["spec"]["containers"][0]["volumeMount"] = template["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kubernetes_validate.ValidationError, match="volumeMount"):
        validate_k8s(as_pod_template(template))


def test_kuberay_cluster_and_job_agree_with_the_code_and_each_other() -> None:
    (cluster,) = kuberay("raycluster.yaml")
    (job,) = kuberay("rayjob.yaml")
    claims = {d["metadata"]["name"] for d in kuberay("storage.yaml")}
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert cluster["spec"]["rayVersion"] == importlib.metadata.version("ray")
    head = cluster["spec"]["headGroupSpec"]
    params = ray_start(["ray", "start", "--head", *(f"--{k}={v}" for k, v in head["rayStartParams"].items())])
    assert params["num_gpus"] == 0
    (head_container,) = head["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in head_container["ports"]} == set(PORTS.values())
    for template in pod_templates(cluster):
        (container,) = template["spec"]["containers"]
        assert container["image"] == IMAGE
        assert ENV - {"WANDB_MODE"} <= {e["name"] for e in container["env"]}
        assert all("value" not in e for e in container["env"] if e["name"] == "WANDB_API_KEY")  # a Secret only
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        assert mounts[DATA]["readOnly"] is True
        assert RESULTS in mounts
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for m in (mounts[DATA], mounts[RESULTS]):
            assert volumes[m["name"]]["persistentVolumeClaim"]["claimName"] in claims
    assert {e["name"] for e in head_container["env"]} >= ENV
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        ray_start(["ray", "start", *(f"--{k}={v}" for k, v in group["rayStartParams"].items())])
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]

    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    check_sweep_command(shlex.split(job["spec"]["entrypoint"]))
    runtime_env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    assert set(runtime_env) == {"env_vars"}  # no pip or working_dir: the image has everything
    assert "WANDB_API_KEY" not in runtime_env["env_vars"]
    assert job["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == IMAGE


# --- Ray cluster launcher ----------------------------------------------------------------


def launcher() -> dict[str, Any]:
    return dict(yaml.safe_load((INFRA / "ray-cluster.yaml").read_text()))


def test_launcher_config_passes_rays_own_validation() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))


def test_launcher_config_has_gpu_workers_within_bounds_and_agrees() -> None:
    config = launcher()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"]["GPU"] == 0
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers
    for w in workers:
        assert w["resources"]["GPU"] >= 1
        assert 0 <= w["min_workers"] <= w["max_workers"] <= config["max_workers"]
    docker = config["docker"]
    options = " ".join(docker["run_options"])
    assert f"-v {DATA}:{DATA}:ro" in options
    assert f"-v {RESULTS}:{RESULTS}" in options
    assert "--gpus" not in options  # the head has no GPU: `docker run --gpus` would fail there
    assert docker["worker_run_options"] == ["--gpus all"]
    assert set(re.findall(r"-e (\w+)=", options)) >= ENV
    (head_start,) = [shlex.split(c) for c in config["head_start_ray_commands"] if "start" in c]
    params = ray_start(head_start)
    assert (params["port"], params["dashboard_port"]) == (PORTS["gcs"], PORTS["dashboard"])
    assert params["dashboard_host"] == "127.0.0.1"  # reached through `ray dashboard` (an SSH tunnel)
    (worker_start,) = [shlex.split(c) for c in config["worker_start_ray_commands"] if "start" in c]
    assert ray_start(worker_start)["address"] == f"$RAY_HEAD_IP:{PORTS['gcs']}"
    # Placeholders a user must fill, never a stale default (Ray's `latest_dlami` is Ubuntu 18.04).
    assert docker["image"] == "<IMAGE>"
    assert {t["node_config"]["ImageId"] for t in types.values()} == {"<AMI>"}


# --- Ray's token auth ----------------------------------------------------------------------

KUBERAY_TOKEN_KEY = "auth_token"  # the key KubeRay's operator reads in the Secret authOptions names


def infra_files() -> list[Path]:
    return sorted(p for p in INFRA.rglob("*") if p.is_file())


def test_no_config_turns_ray_auth_off() -> None:
    for path in infra_files():
        text = path.read_text()
        assert not re.search(r"RAY_AUTH_MODE\W{0,20}(value\W{0,3})?disabled", text), path
    assert not re.search(r"RAY_AUTH_MODE=disabled", (REPO / "docs" / "cluster.md").read_text())


def test_the_token_is_referenced_never_written() -> None:
    # No config holds a token: no Secret manifest, no RAY_AUTH_TOKEN set to a literal.
    for path in infra_files():
        text = path.read_text()
        assert not re.search(r"^kind:\s*Secret\b", text, re.M), path
        for m in re.finditer(r"RAY_AUTH_TOKEN\b[\"']?\s*[:=]\s*(\S+)", text):
            # a compose interpolation, or in a comment a shell reading it from where it is kept
            assert m.group(1).startswith(("${RAY_AUTH_TOKEN:?", "$(", '"$(')), (path, m.group(0))
    # Compose: from the shell of each host, and compose refuses to start without it.
    raw = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    env = raw["x-node"]["environment"]
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?")
    for svc in compose()["services"].values():
        assert svc["environment"]["RAY_AUTH_TOKEN"] == "<RAY_AUTH_TOKEN>"


def test_kuberay_pods_the_submitter_and_the_operator_share_one_token_secret() -> None:
    (cluster,) = kuberay("raycluster.yaml")
    (job,) = kuberay("rayjob.yaml")
    auth = cluster["spec"]["authOptions"]
    assert auth["mode"] == "token"
    secret = auth["secretName"]  # the operator's own dashboard calls (a RayJob's status) use it
    containers = [t["spec"]["containers"][0] for t in pod_templates(cluster)]
    containers.append(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])
    for container in containers:
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"] == {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": secret, "key": KUBERAY_TOKEN_KEY}},
        }, container["name"]
    assert (
        f"kubectl create secret generic {secret} --from-literal={KUBERAY_TOKEN_KEY}="
        in (INFRA / "kuberay" / "raycluster.yaml").read_text()
    )


def test_launcher_gives_every_node_the_token_file_of_the_launching_machine() -> None:
    config = launcher()
    options = dict(re.findall(r"-e (\w+)=(\S+)", " ".join(config["docker"]["run_options"])))
    assert options["RAY_AUTH_MODE"] == "token"
    assert "RAY_AUTH_TOKEN" not in options
    path = options["RAY_AUTH_TOKEN_PATH"]
    # Copied by `ray up` from the user's home (Ray's default token file), never from the repo;
    # in the container, Ray's default path for the image's user.
    assert config["file_mounts"][path] == "~/.ray/auth_token"
    assert path == "/home/harness/.ray/auth_token"
    assert "useradd --create-home --uid 1000 --shell /bin/bash harness" in " ".join(
        rest for word, rest in dockerfile() if word == "RUN"
    )
    for command in [*config["head_start_ray_commands"], *config["worker_start_ray_commands"]]:
        assert "RAY_AUTH" not in command  # the container's environment says it, once


def test_every_node_of_every_config_gets_the_node_failure_settings() -> None:
    """A lost host's runs go elsewhere in seconds only where Ray is started with them."""
    from harness.sweep.cluster import node_failure_env

    want = node_failure_env()
    raw = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    assert {k: str(raw["x-node"]["environment"].get(k)) for k in want} == want
    (cluster,) = kuberay("raycluster.yaml")
    for template in pod_templates(cluster):
        env = {e["name"]: e.get("value") for e in template["spec"]["containers"][0]["env"]}
        assert {k: env.get(k) for k in want} == want
    options = dict(re.findall(r"-e (\w+)=(\S+)", " ".join(launcher()["docker"]["run_options"])))
    assert {k: options.get(k) for k in want} == want
