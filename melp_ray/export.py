"""python -m melp_ray.export: a training checkpoint -> a Hugging Face model folder.

    python -m melp_ray.export --checkpoint ~/ray_results/melp_ray/melp-tiny --out exported/
    python -m melp_ray.export --checkpoint s3://bucket/melp_ray/run/checkpoint_... --out exported/ \
        --eval-results results.json

--checkpoint is a checkpoint folder or a run folder (its latest checkpoint is used), a
local path or a URI; any ZeRO stage. The folder written (see ``melp_ray.hf``) loads with

    import melp_ray.hf; transformers.AutoModel.from_pretrained("exported/")
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import yaml

from melp_ray import checkpoint as ckpt_lib
from melp_ray import storage


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a/b": 1}, for the model card's metric table."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def export(checkpoint: str, out: str, eval_results: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the HF folder; returns {"checkpoint", "out", "step", "parameters"}."""
    from melp_ray.hf import MELPHFModel, save_folder

    source = ckpt_lib.resolve_checkpoint(checkpoint)
    train_config = ckpt_lib.checkpoint_config(source)
    model = ckpt_lib.load_model_from_checkpoint(source)
    data = train_config.get("data", {})
    hf_model = MELPHFModel.from_melp(model, sample_rate=data.get("sample_rate"),
                                     seconds=data.get("seconds"))
    save_folder(hf_model, out)

    step = ckpt_lib.checkpoint_step(source)
    summary = run_summary(source)
    card = model_card(source, step, train_config, summary, eval_results,
                      n_params=sum(p.numel() for p in model.parameters()))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)
    return {"checkpoint": source, "out": os.path.abspath(out), "step": step,
            "parameters": sum(p.numel() for p in model.parameters())}


def run_summary(checkpoint: str) -> dict[str, Any] | None:
    """The run's summary.json, when it exists and describes this very checkpoint."""
    run = ckpt_lib.run_folder_of(checkpoint)
    if run is None or not storage.exists(storage.join(run, "summary.json")):
        return None
    summary = storage.read_json(storage.join(run, "summary.json"))
    last = str(summary.get("last_checkpoint") or "").rstrip("/")
    # Compare by folder name: the summary may hold a URI, the checkpoint a local path.
    if last.split("/")[-1] != checkpoint.rstrip("/").split("/")[-1]:
        return None
    return summary


def _metrics_table(metrics: dict[str, Any]) -> list[str]:
    rows = ["| metric | value |", "|---|---|"]
    for k, v in sorted(flatten(metrics).items()):
        rows.append(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |")
    return rows


def model_card(source: str, step: int | None, train_config: dict[str, Any],
               summary: dict[str, Any] | None, eval_results: dict[str, Any] | None,
               n_params: int) -> str:
    model = train_config.get("model", {})
    lines = [
        "---",
        "library_name: melp_ray",
        "tags: [ecg, multimodal, contrastive, melp]",
        "---",
        "",
        f"# MELP ({model.get('preset', '?')} preset)",
        "",
        "An ECG-language model pretrained with melp_ray (MELP: rhythm contrastive, captioning "
        "and beat-sentence alignment losses).",
        "",
        f"- Source checkpoint: `{source}`" + (f" (optimizer step {step})" if step is not None else ""),
        f"- Parameters: {n_params:,}",
        f"- Input: 12-lead ECG, {train_config.get('data', {}).get('sample_rate')} Hz, "
        f"{train_config.get('data', {}).get('seconds')} s, min-max scaled to [0, 1] per record",
        "",
        "## Usage",
        "",
        "```python",
        "import melp_ray.hf  # registers model_type 'melp'",
        "from transformers import AutoModel",
        "model = AutoModel.from_pretrained('PATH/TO/THIS/FOLDER')",
        "ecg_emb = model.encode_ecg(signals)            # (B, 12, T) -> (B, D), L2-normalised",
        "text_emb = model.encode_text(['sinus rhythm.'])  # (N, D)",
        "```",
        "",
        "## Evaluation results",
        "",
    ]
    have_results = False
    if eval_results:
        lines += ["From the supplied evaluation results:", "", *_metrics_table(eval_results), ""]
        have_results = True
    if summary:
        if summary.get("validation"):
            lines += ["Validation at the end of training (run summary):", "",
                      *_metrics_table(summary["validation"]), ""]
            have_results = True
        if summary.get("losses"):
            lines += ["Training losses of the last logging window:", "",
                      *_metrics_table(summary["losses"]), ""]
    if not have_results:
        lines += ["No evaluation results were available when this folder was exported.", ""]
    lines += ["## Training configuration", "", "```yaml",
              yaml.safe_dump(train_config, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m melp_ray.export",
        description="Export a melp_ray training checkpoint (any ZeRO stage) to a Hugging Face folder.")
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint folder or run folder (latest checkpoint); path or URI")
    parser.add_argument("--out", required=True, help="output folder (local)")
    parser.add_argument("--eval-results", help="JSON file of evaluation metrics for the model card")
    args = parser.parse_args(argv)
    eval_results = None
    if args.eval_results:
        with open(args.eval_results) as f:
            eval_results = json.load(f)
    try:
        info = export(args.checkpoint, args.out, eval_results)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
