"""Offline checks of the cluster configs in cluster/ (no cloud SDK, no Kubernetes, no Ray runtime)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from melp_ray.utils.cluster_checks import (
    ClusterConfigError,
    check_kuberay_manifest,
    install_order_problems,
    validate_launcher_yaml,
)

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
RAYCLUSTER = CLUSTER / "kuberay" / "raycluster.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def write_broken(tmp_path: Path, src: Path, edit) -> Path:
    """A copy of ``src`` with ``edit`` applied; placed in tmp_path/cluster/ next to a copy of
    constraints.txt so the install-order rule sees the same pin as the repository."""
    config = load(src)
    edit(config)
    (tmp_path / "cluster").mkdir(exist_ok=True)
    (tmp_path / "constraints.txt").write_text((REPO / "constraints.txt").read_text())
    out = tmp_path / "cluster" / src.name
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out


# ---------------------------------------------------------------- launcher YAMLs

@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_yaml_validates(path):
    prepared = validate_launcher_yaml(path)
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0 and head["resources"].get("GPU", 0) == 0
    assert head["max_workers"] == 0  # filled in by Ray's prepare_config
    gpu = types["gpu_worker"]
    assert gpu["resources"]["GPU"] == 8
    assert gpu["min_workers"] == 0 < gpu["max_workers"] <= prepared["max_workers"]
    assert types["cpu_worker"]["resources"].get("GPU", 0) == 0
    assert prepared["idle_timeout_minutes"] > 0


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_dashboard_not_public(path):
    config = load(path)
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start
    assert "0.0.0.0" not in path.read_text().replace("from 0.0.0.0/0", "")


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_installs_package_the_readme_way(path):
    config = load(path)
    setup = config["setup_commands"]
    pin = next(line for line in (REPO / "constraints.txt").read_text().splitlines()
               if line.startswith("torch=="))
    assert pin.startswith("torch==")
    torch_at = next(i for i, c in enumerate(setup) if f"pip install {pin}" in c)
    pkg_at = next(i for i, c in enumerate(setup) if "pip install -c constraints.txt -e ." in c)
    assert torch_at < pkg_at
    # The code the package is installed from is what file_mounts syncs there.
    mount = next(remote for remote, local in config["file_mounts"].items() if local == ".")
    assert f"cd {mount} &&" in setup[pkg_at]
    assert install_order_problems(setup, pin) == []


def test_dockerfile_installs_package_the_readme_way():
    text = (CLUSTER / "Dockerfile").read_text()
    runs = [line for line in text.splitlines() if line.startswith("RUN ")]
    assert install_order_problems(runs, "torch==2.13.0") == []
    assert re.search(r"^FROM rayproject/ray:2\.60\.0-py311-gpu$", text, re.M)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.update(idle_timeout_minute=5), "'idle_timeout_minute' was unexpected"),
        (lambda c: c["available_node_types"]["gpu_worker"].update(min_workers=5, max_workers=2),
         "'gpu_worker': min_workers=5 > max_workers=2"),
        (lambda c: c.update(head_node_type="no_such_type"),
         "`head_node_type` must be one of `available_node_types`"),
        (lambda c: c["available_node_types"]["head"]["resources"].update(CPU=0.5),
         "available_node_types.head.resources.CPU: 0.5 is not of type 'integer'"),
        (lambda c: (c["available_node_types"]["cpu_worker"].update(min_workers=2), c.update(max_workers=1)),
         "global `max_workers` is smaller than the sum of `min_workers`"),
    ],
    ids=["unknown-key", "min>max", "bad-head-type", "fractional-resource", "global-max"],
)
def test_broken_launcher_yaml_fails_clearly(tmp_path, edit, expected):
    broken = write_broken(tmp_path, CLUSTER / "aws.yaml", edit)
    with pytest.raises(ClusterConfigError) as err:
        validate_launcher_yaml(broken)
    assert expected in str(err.value)
    assert str(broken) in str(err.value)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c["available_node_types"]["head"]["resources"].update(CPU=8),
         "head node type must advertise resources CPU: 0"),
        (lambda c: c["setup_commands"].reverse(), "torch must be installed before the package"),
        (lambda c: c["setup_commands"].__setitem__(0, "pip install torch==2.5.0"),
         "but constraints.txt pins torch==2.13.0"),
        (lambda c: c.__setitem__("head_start_ray_commands", [
            "ray start --head --autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0"]),
         "dashboard on 0.0.0.0"),
    ],
    ids=["head-cpu", "install-order", "torch-pin", "public-dashboard"],
)
def test_project_rules(tmp_path, edit, expected):
    broken = write_broken(tmp_path, CLUSTER / "gcp.yaml", edit)
    with pytest.raises(ClusterConfigError, match=re.escape(expected)):
        validate_launcher_yaml(broken)
    # The same file is fine for Ray itself.
    validate_launcher_yaml(broken, project_rules=False)


# ---------------------------------------------------------------- KubeRay

def test_raycluster_manifest():
    derived = check_kuberay_manifest(RAYCLUSTER)
    cr = load(RAYCLUSTER)
    spec = cr["spec"]
    assert cr["kind"] == "RayCluster" and spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    head_limits = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in head_limits
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu_limits["nvidia.com/gpu"] == "8"
    assert groups["gpu"]["minReplicas"] == 0 < groups["gpu"]["maxReplicas"]
    assert "nvidia.com/gpu" not in groups["cpu-data"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    # What Ray's KubeRay autoscaler would see (empty only if Ray's private helper moved).
    if derived:
        types = derived["available_node_types"]
        assert types["headgroup"]["resources"]["CPU"] == 0
        assert "GPU" not in types["headgroup"]["resources"]
        assert types["gpu"]["resources"]["GPU"] == 8
        assert (types["gpu"]["min_workers"], types["gpu"]["max_workers"]) == (0, 4)


def test_rayjob_manifest():
    check_kuberay_manifest(RAYJOB)
    job = load(RAYJOB)
    spec = job["spec"]
    assert job["kind"] == "RayJob"
    entry = spec["entrypoint"].split()
    assert entry[:5] == ["python", "-m", "melp_ray.pretrain", "--config", "paper"]
    assert any(a.startswith("run.storage_path=s3://") for a in entry)
    assert any(a.startswith("run.name=") for a in entry)
    assert spec["shutdownAfterJobFinishes"] is True
    # One cluster definition, two files: the job's cluster is the RayCluster's spec.
    assert spec["rayClusterSpec"] == load(RAYCLUSTER)["spec"]


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda j: j["spec"].update(entrypoint="python train.py"), "entrypoint must start with"),
        (lambda j: j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
         ["resources"]["limits"].update({"nvidia.com/gpu": "1"}), "head pod must not request nvidia.com/gpu"),
        (lambda j: j["spec"]["rayClusterSpec"].update(enableInTreeAutoscaling=False),
         "enableInTreeAutoscaling must be true"),
        (lambda j: j["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].update(minReplicas=5, maxReplicas=2),
         "'gpu': minReplicas=5 > maxReplicas=2"),
        (lambda j: [g["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu", None)
                    for g in j["spec"]["rayClusterSpec"]["workerGroupSpecs"]],
         "no worker group has an nvidia.com/gpu limit"),
        (lambda j: j["spec"].pop("shutdownAfterJobFinishes"), "shutdownAfterJobFinishes must be true"),
    ],
    ids=["entrypoint", "head-gpu", "no-autoscaling", "min>max", "no-gpu-group", "no-shutdown"],
)
def test_broken_rayjob_fails_clearly(tmp_path, edit, expected):
    job = load(RAYJOB)
    edit(job)
    broken = tmp_path / "rayjob.yaml"
    broken.write_text(yaml.safe_dump(job))
    with pytest.raises(ClusterConfigError, match=re.escape(expected)):
        check_kuberay_manifest(broken)


# ---------------------------------------------------------------- CLI

@pytest.mark.slow
def test_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "melp_ray.cluster", "validate", *map(str, LAUNCHERS),
                         str(RAYCLUSTER), str(RAYJOB)], capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.count(" OK") == 4

    broken = write_broken(tmp_path, CLUSTER / "aws.yaml", lambda c: c.update(head_node_type="gpu_worker"))
    bad = subprocess.run([sys.executable, "-m", "melp_ray.cluster", "validate", str(broken)],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1
    assert "FAILED" in bad.stderr and "head node type must advertise resources CPU: 0" in bad.stderr


def test_rayjob_entrypoint_is_a_valid_pretrain_config(tmp_path):
    """The RayJob's overrides are accepted by the real config loader. data.root points at the
    cluster's shared volume, which does not exist here: substitute an existing folder."""
    from melp_ray.config import PretrainConfig, load_config

    args = load(RAYJOB)["spec"]["entrypoint"].split()[3:]
    assert args[0] == "--config"
    overrides = [f"data.root={tmp_path}" if a.startswith("data.root=") else a for a in args[2:]]
    assert any(a.startswith("data.root=/mnt/shared/") for a in args)
    cfg = load_config(PretrainConfig, args[1], overrides)
    assert cfg.train.use_gpu and cfg.train.num_workers == 8
    assert cfg.run.storage_path.startswith("s3://") and cfg.run.name == "melp-paper-v1"
