"""Offline checks for the cluster configs in ``cluster/``.

    python -m melp_ray.cluster validate cluster/aws.yaml cluster/kuberay/rayjob.yaml

What is checked: ``melp_ray.utils.cluster_checks``.
"""
from __future__ import annotations

import argparse
import sys

from melp_ray.utils.cluster_checks import ClusterConfigError, validate_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m melp_ray.cluster",
                                     description="Offline checks for cluster configs.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="validate launcher YAMLs and KubeRay manifests")
    v.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)

    failed = 0
    for path in args.paths:
        try:
            print(f"{path}: {validate_path(path)}")
        except ClusterConfigError as e:
            failed += 1
            print(f"{path}: FAILED", file=sys.stderr)
            for problem in e.problems:
                print(f"  - {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
