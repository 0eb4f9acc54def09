"""python -m melp_ray.export: a training checkpoint -> a Hugging Face model folder.

    python -m melp_ray.export --checkpoint ~/ray_results/melp_ray/melp-small --out exported/
    python -m melp_ray.export --checkpoint s3://bucket/melp_ray/run/checkpoint_... --out exported/ \
        --eval-results results.json

--checkpoint is a checkpoint folder or a run folder (its selected checkpoint is used), a
local path or a URI; any ZeRO stage. The folder carries its own code (see ``melp_ray.hub.hf``)
and loads anywhere with only torch and transformers:

    transformers.AutoModel.from_pretrained("exported/", trust_remote_code=True)

The work is done in ``melp_ray.hub.export`` (folder, model card) and ``melp_ray.hub.push``.
"""
from __future__ import annotations

import argparse
import json
import sys

from melp_ray.hub.export import export
from melp_ray.hub.push import push_to_hub


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.export",
        description="Export a melp_ray training checkpoint (any ZeRO stage) to a Hugging Face folder.")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder or run folder (latest checkpoint); path or URI")
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--eval-results", help="JSON file of evaluation metrics for the model card")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME",
                        help="then upload the folder to this Hugging Face Hub model repository")
    parser.add_argument("--public", action="store_true", help="with --push-to-hub: a public repository "
                        "(default: private)")
    args = parser.parse_args(argv)
    eval_results = None
    if args.eval_results:
        with open(args.eval_results) as f:
            eval_results = json.load(f)
    try:
        info = export(args.checkpoint, args.out, eval_results)
    except (FileNotFoundError, NotADirectoryError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.push_to_hub:
        info["hub_url"] = push_to_hub(args.out, args.push_to_hub, private=not args.public)
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
