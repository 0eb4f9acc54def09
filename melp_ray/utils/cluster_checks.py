"""Offline checks for the cluster configs in ``cluster/`` (``python -m melp_ray.cluster validate``).

Launcher YAMLs go through Ray's own schema (``prepare_config`` + ``validate_config``: no
cloud SDK, no network), then through the checks Ray does not do (a node type whose
``min_workers`` exceeds its ``max_workers`` passes Ray's validation) and this project's
rules (CPU-only head, a GPU worker type, the README's install order). KubeRay manifests
(RayCluster / RayJob) are checked structurally and, where Ray's private helper is
importable, by deriving the autoscaling config the KubeRay autoscaler would use.
"""
from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import yaml

PRETRAIN_ENTRYPOINT = "python -m melp_ray.pretrain"
GPU_LIMIT_KEY = "nvidia.com/gpu"


class ClusterConfigError(ValueError):
    """A cluster config that would not launch, or would launch the wrong cluster."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        super().__init__(f"{path}:\n" + "\n".join(f"  - {p}" for p in problems))


def _load_yaml(path: str | Path) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ClusterConfigError(path, [f"cannot read YAML: {e}"]) from None


def _required_torch_pin(repo: Path) -> str | None:
    """The torch pin from constraints.txt ("torch==X"), which setup must install first."""
    constraints = repo / "constraints.txt"
    if not constraints.is_file():
        return None
    for line in constraints.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if re.match(r"^torch\s*==", line):
            return line.replace(" ", "")
    return None


# ---------------------------------------------------------------- launcher YAMLs

def _ray_schema_problems(config: dict) -> tuple[list[str], dict | None]:
    """Run Ray's own preparation + schema validation; return (problems, prepared config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        import jsonschema
    except ImportError:  # validate_config needs it; ray[default] brings it
        return ["jsonschema is not installed (pip install jsonschema)"], None

    if not isinstance(config.get("provider"), dict) or "type" not in config["provider"]:
        return ["provider.type is missing"], None
    util_logger = logging.getLogger("ray.autoscaler._private.util")
    level = util_logger.level
    util_logger.setLevel(logging.WARNING)  # prepare_config logs each filled-in default at INFO
    try:
        prepared = prepare_config(copy.deepcopy(config))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "<top level>"
        return [f"Ray schema: {where}: {e.message}"], None
    except NotImplementedError as e:  # unknown provider type
        return [f"Ray: {e}"], None
    except (ValueError, RuntimeError, KeyError, AssertionError) as e:
        return [f"Ray: {e}"], None
    finally:
        util_logger.setLevel(level)
    return [], prepared


def _min_max_problems(config: dict) -> list[str]:
    problems = []
    for name, node_type in (config.get("available_node_types") or {}).items():
        lo, hi = node_type.get("min_workers", 0), node_type.get("max_workers")
        if hi is not None and lo > hi:
            problems.append(f"node type {name!r}: min_workers={lo} > max_workers={hi}")
    return problems


def _commands(config: dict, *keys: str) -> list[str]:
    return [c for k in keys for c in (config.get(k) or [])]


def install_order_problems(commands: list[str], torch_pin: str | None) -> list[str]:
    """README install: `pip install torch==X` first, then the package with -c constraints.txt."""
    torch_at = next((i for i, c in enumerate(commands)
                     if re.search(r"pip install\s+(\S+\s+)*torch==", c)), None)
    pkg_at = next((i for i, c in enumerate(commands)
                   if re.search(r"pip install\b.*-c\s+constraints\.txt\b.*(-e\s+)?\.(\s|$|\[)", c)),
                  None)
    problems = []
    if torch_at is None:
        problems.append("setup commands never `pip install torch==<pin>`")
    elif torch_pin and torch_pin not in commands[torch_at].replace(" ", "").split("install")[-1]:
        problems.append(f"setup installs {commands[torch_at]!r} but constraints.txt pins {torch_pin}")
    if pkg_at is None:
        problems.append("setup commands never install the package with `pip install -c constraints.txt .`")
    if torch_at is not None and pkg_at is not None and torch_at > pkg_at:
        problems.append("torch must be installed before the package (README order)")
    return problems


def _project_problems(config: dict, repo: Path) -> list[str]:
    """What this project needs from a launcher config beyond Ray's schema."""
    problems = []
    types = config.get("available_node_types") or {}
    head = types.get(config.get("head_node_type"), {})
    head_res = head.get("resources", {})
    if head_res.get("CPU") != 0:
        problems.append("head node type must advertise resources CPU: 0 (no train/data work on the head)")
    if head_res.get("GPU", 0) != 0:
        problems.append("head node type must not advertise GPUs")
    gpu_types = [n for n, t in types.items()
                 if n != config.get("head_node_type") and t.get("resources", {}).get("GPU", 0) > 0]
    if not gpu_types:
        problems.append("no worker node type advertises GPUs")
    for name in gpu_types:
        if types[name].get("min_workers", 0) != 0:
            problems.append(f"GPU node type {name!r} should autoscale from min_workers: 0")
    start = " ".join(_commands(config, "head_start_ray_commands"))
    if "--dashboard-host=0.0.0.0" in start.replace(" =", "=").replace("= ", "="):
        problems.append("head starts the dashboard on 0.0.0.0; bind 127.0.0.1 and use `ray dashboard`")
    setup = _commands(config, "setup_commands")
    problems += install_order_problems(setup, _required_torch_pin(repo))
    return problems


def validate_launcher_yaml(path: str | Path, *, project_rules: bool = True,
                           repo: str | Path | None = None) -> dict:
    """Validate a `ray up` YAML offline; return Ray's prepared config or raise ClusterConfigError.

    Catches what Ray's schema catches (unknown keys, wrong types such as fractional
    resources, a head_node_type not in available_node_types, global max_workers below the
    sum of min_workers), per-node-type min_workers > max_workers (Ray lets it through), and
    with ``project_rules`` this project's layout (see ``_project_problems``).
    """
    config = _load_yaml(path)
    if not isinstance(config, dict):
        raise ClusterConfigError(path, ["top level must be a mapping"])
    problems, prepared = _ray_schema_problems(config)
    problems += _min_max_problems(config)
    if project_rules and not problems:
        repo = Path(repo) if repo else Path(path).resolve().parents[1]
        problems += _project_problems(config, repo)
    if problems:
        raise ClusterConfigError(path, problems)
    return prepared


# ---------------------------------------------------------------- KubeRay manifests

def _container(group: dict) -> dict:
    # KubeRay treats the first container of the pod template as the Ray container.
    return (((group.get("template") or {}).get("spec") or {}).get("containers") or [{}])[0]


def _gpu_limit(group: dict) -> int:
    limits = (_container(group).get("resources") or {}).get("limits") or {}
    try:
        return int(limits.get(GPU_LIMIT_KEY, 0))
    except (TypeError, ValueError):
        return 0


def _raycluster_spec_problems(spec: dict) -> list[str]:
    problems = []
    if not spec.get("enableInTreeAutoscaling"):
        problems.append("spec.enableInTreeAutoscaling must be true")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return problems + ["spec.headGroupSpec is missing"]
    if _gpu_limit(head):
        problems.append("head pod must not request nvidia.com/gpu")
    if str((head.get("rayStartParams") or {}).get("num-cpus")) != "0":
        problems.append('head rayStartParams must set num-cpus: "0" (no train/data work on the head)')
    if not _container(head).get("image"):
        problems.append("head container has no image")
    groups = spec.get("workerGroupSpecs") or []
    gpu_groups = [g for g in groups if _gpu_limit(g) > 0]
    if not gpu_groups:
        problems.append("no worker group has an nvidia.com/gpu limit")
    for g in groups:
        name = g.get("groupName", "<unnamed>")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not isinstance(lo, int) or not isinstance(hi, int):
            problems.append(f"worker group {name!r}: minReplicas and maxReplicas are required integers")
        elif lo > hi:
            problems.append(f"worker group {name!r}: minReplicas={lo} > maxReplicas={hi}")
        if not _container(g).get("image"):
            problems.append(f"worker group {name!r}: container has no image")
    for g in gpu_groups:
        if g.get("minReplicas") != 0:
            problems.append(f"GPU worker group {g.get('groupName')!r} should scale from minReplicas: 0")
    return problems


def derive_autoscaling_config(raycluster: dict) -> dict | None:
    """The autoscaling config KubeRay's autoscaler would derive from a RayCluster CR.

    Wraps a private Ray function (its name/signature may change between Ray versions):
    returns None when it is unavailable or does not accept a bare CR dict, and raises
    ValueError for a CR it rejects.
    """
    try:
        from ray.autoscaler._private.kuberay.autoscaling_config import (
            _derive_autoscaling_config_from_ray_cr as derive,
        )
    except ImportError:
        return None
    cr = copy.deepcopy(raycluster)
    cr.setdefault("metadata", {}).setdefault("namespace", "default")
    cr["metadata"].setdefault("name", "melp-ray")
    try:
        return derive(cr)
    except TypeError:  # a different signature in this Ray version: skip, don't guess
        return None
    except Exception as e:  # noqa: BLE001 - anything else is the CR's fault
        raise ValueError(f"Ray's KubeRay autoscaler rejects the spec: {type(e).__name__}: {e}") from e


def check_kuberay_manifest(path: str | Path) -> dict:
    """Check a RayCluster or RayJob manifest; return the derived autoscaling config ({} if
    Ray's helper is unavailable) or raise ClusterConfigError."""
    docs = [d for d in _load_yaml_all(path) if d]
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ClusterConfigError(path, ["expected exactly one YAML document (a RayCluster or a RayJob)"])
    doc = docs[0]
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    problems = []
    if not str(doc.get("apiVersion", "")).startswith("ray.io/"):
        problems.append(f"apiVersion {doc.get('apiVersion')!r} is not ray.io/*")
    if kind == "RayCluster":
        cluster_spec = spec
    elif kind == "RayJob":
        entry = " ".join(str(spec.get("entrypoint", "")).split())
        if not entry.startswith(PRETRAIN_ENTRYPOINT):
            problems.append(f"entrypoint must start with {PRETRAIN_ENTRYPOINT!r}, got {entry!r}")
        if "run.storage_path=" not in entry:
            problems.append("entrypoint must pass run.storage_path= (shared storage for checkpoints)")
        if spec.get("clusterSelector"):
            cluster_spec = None  # runs on an existing RayCluster, checked on its own
        else:
            cluster_spec = spec.get("rayClusterSpec")
            if not isinstance(cluster_spec, dict):
                problems.append("RayJob needs spec.rayClusterSpec or spec.clusterSelector")
            if spec.get("shutdownAfterJobFinishes") is not True:
                problems.append("spec.shutdownAfterJobFinishes must be true (don't leave GPUs running)")
    else:
        raise ClusterConfigError(path, [f"kind must be RayCluster or RayJob, got {kind!r}"])

    derived: dict = {}
    if isinstance(cluster_spec, dict):
        problems += _raycluster_spec_problems(cluster_spec)
        if not problems:
            try:
                derived = derive_autoscaling_config(
                    {"metadata": doc.get("metadata") or {}, "spec": cluster_spec}) or {}
            except ValueError as e:
                problems.append(str(e))
    if problems:
        raise ClusterConfigError(path, problems)
    return derived


def _load_yaml_all(path: str | Path) -> list:
    try:
        with open(path) as f:
            return list(yaml.safe_load_all(f))
    except (OSError, yaml.YAMLError) as e:
        raise ClusterConfigError(path, [f"cannot read YAML: {e}"]) from None


def validate_path(path: str | Path) -> str:
    """Validate one file of either kind; return a one-line summary or raise ClusterConfigError."""
    head = _load_yaml_all(path)
    first = next((d for d in head if d), None)
    if isinstance(first, dict) and first.get("kind") in ("RayCluster", "RayJob"):
        derived = check_kuberay_manifest(path)
        types = derived.get("available_node_types", {})
        summary = ", ".join(f"{n}: {t['resources']} x{t['min_workers']}..{t['max_workers']}"
                            for n, t in types.items())
        return f"{first['kind']} OK" + (f" ({summary})" if summary else "")
    prepared = validate_launcher_yaml(path)
    types = prepared["available_node_types"]
    summary = ", ".join(f"{n}: {t['resources']} x{t.get('min_workers', 0)}..{t.get('max_workers')}"
                        for n, t in types.items())
    return f"launcher OK ({summary})"
