"""A training checkpoint -> a Hugging Face model folder with its model card
(``python -m melp_ray.export`` is the command line).

The checkpoint is a checkpoint folder or a run folder (its selected checkpoint is used), a
local path or a URI; any ZeRO stage. The folder carries its own code (see ``melp_ray.hub.hf``)
and loads anywhere with only torch and transformers:

    transformers.AutoModel.from_pretrained("exported/", trust_remote_code=True)
"""
from __future__ import annotations

import os
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from melp_ray.hub import checkpoint as ckpt_lib
from melp_ray.utils import storage
from melp_ray.data.leads import LEADS


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
    from melp_ray.hub.hf import MELPHFModel

    source = ckpt_lib.resolve_checkpoint(checkpoint)
    train_config = ckpt_lib.checkpoint_config(source)
    model = ckpt_lib.load_model_from_checkpoint(source)
    data = train_config.get("data", {})
    hf_model = MELPHFModel.from_melp(model, sample_rate=data.get("sample_rate"),
                                     seconds=data.get("seconds"), leads=list(LEADS))
    hf_model.save_pretrained(out)

    step = ckpt_lib.checkpoint_step(source)
    summary = run_summary(source)
    card = model_card(source, step, train_config, summary, eval_results,
                      n_params=sum(p.numel() for p in model.parameters()))
    card.save(os.path.join(out, "README.md"))
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


CITATION = """@inproceedings{melp2025,
  title         = {From Token to Rhythm: A Multi-Scale Approach for ECG-Language Pretraining},
  author        = {Wang, Fuying and others},
  booktitle     = {International Conference on Machine Learning (ICML)},
  year          = {2025},
  eprint        = {2506.21803},
  archivePrefix = {arXiv},
  note          = {Reference code: https://github.com/HKU-MedAI/MELP}
}"""


def _training_lines(train_config: dict[str, Any], step: int | None, source: str,
                    n_params: int) -> list[str]:
    model, train, loss = (train_config.get(k, {}) for k in ("model", "train", "loss"))
    return [
        f"- Source checkpoint: `{source}`" + (f" (optimizer step {step})" if step is not None else ""),
        f"- Architecture: MELP, `{model.get('preset', '?')}` preset, {n_params:,} parameters "
        f"(ECG encoder, beat and caption poolers, causal text tower, multimodal decoder)",
        f"- Objectives and weights: rhythm (contrastive) {loss.get('rhythm')}, token "
        f"(captioning) {loss.get('token')}, beat (beat-sentence alignment) {loss.get('beat')}",
        f"- {train.get('max_steps')} steps at global batch {train.get('global_batch_size')}, "
        f"lr {train.get('lr')} ({train.get('schedule')}), weight decay {train.get('weight_decay')}, "
        f"ZeRO stage {train_config.get('deepspeed', {}).get('zero_stage')}, precision "
        f"{train.get('precision')}; melp_ray (Ray Train + DeepSpeed)",
    ]


def _data_lines(train_config: dict[str, Any], summary: dict[str, Any] | None) -> list[str]:
    data = train_config.get("data", {})
    root = data.get("root") or "the PTB-XL sample bundled with melp_ray (259 records, CC BY 4.0)"
    lines = [f"- Records: `{root}`" if data.get("root") else f"- Records: {root}",
             f"- Input: 12-lead ECG in the order {', '.join(LEADS)}, {data.get('sample_rate')} Hz, "
             f"{data.get('seconds')} s, min-max scaled to [0, 1] per record; the paired free-text "
             f"report"]
    counts = (summary or {}).get("data") or {}
    if counts:
        held = counts.get("held_out") or {}
        lines.append(f"- {counts.get('train_records')} training / {counts.get('val_records')} "
                     f"validation records" +
                     (f"; {held.get('records')} records of folds {held.get('folds')} held out"
                      if held else ""))
    if data.get("exclude_folds"):
        lines.append(f"- Folds never used for training: {data['exclude_folds']}")
    return lines


def card_eval_results(metrics: dict[str, Any], dataset: str,
                      split: str | None = None) -> list[EvalResult]:
    """Numeric metrics as model-index entries: "task/.../metric" -> task, dataset, metric."""
    results = []
    for key, value in sorted(flatten(metrics).items()):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        parts = key.split("/")
        results.append(EvalResult(
            task_type=parts[0] if len(parts) > 1 else "feature-extraction",
            dataset_type=dataset, dataset_name="/".join(parts[1:-1]) or dataset,
            dataset_split=split, metric_type=parts[-1], metric_name=key, metric_value=value))
    return results


def model_card(source: str, step: int | None, train_config: dict[str, Any],
               summary: dict[str, Any] | None, eval_results: dict[str, Any] | None,
               n_params: int) -> ModelCard:
    """The folder's README.md: metadata (eval results as model-index) + the text below."""
    preset = train_config.get("model", {}).get("preset", "?")
    dataset = os.path.basename(str(train_config.get("data", {}).get("root") or "ptbxl-sample")
                               .rstrip("/")) or "ecg"
    results = card_eval_results(eval_results or {}, dataset) + \
        card_eval_results((summary or {}).get("validation") or {}, dataset, "validation")
    metadata = ModelCardData(
        library_name="transformers", license="apache-2.0",
        tags=["ecg", "electrocardiogram", "multimodal", "contrastive", "melp", "custom_code"],
        model_name=f"melp_ray-{preset}" if results else None, eval_results=results or None)
    lines = [
        f"# MELP ({preset} preset), trained with melp_ray",
        "",
        "An ECG-language model (MELP: multi-scale ECG-language pretraining) that embeds "
        "12-lead ECGs and report text in one space, scores zero-shot classes and writes "
        "reports.",
        "",
        "## Usage",
        "",
        "Only `torch` and `transformers` are needed: the folder carries its own code.",
        "",
        "```python",
        "from transformers import AutoModel",
        "model = AutoModel.from_pretrained('PATH/TO/THIS/FOLDER', trust_remote_code=True)",
        "ecg_emb = model.encode_ecg(signals)              # (B, 12, T) -> (B, D), L2-normalised",
        "text_emb = model.encode_text(['sinus rhythm.'])  # (N, D)",
        "scores = model.zero_shot_scores(signals, {'NORM': ['normal ecg'], "
        "'AFIB': ['atrial fibrillation']})",
        "reports = model.generate(signals)                # greedy, one string per ECG",
        "```",
        "",
        "`signals` must be preprocessed as in training (below); `config.leads`, "
        "`config.sample_rate` and `config.seconds` say how.",
        "",
        "## How it was trained",
        "",
        *_training_lines(train_config, step, source, n_params),
        "",
        "## Training data",
        "",
        *_data_lines(train_config, summary),
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
    lines += [
        "## Licence",
        "",
        "Code (this folder's `*.py`, from melp_ray): Apache-2.0. The weights were trained on "
        "the records above: their terms apply too (PTB-XL: CC BY 4.0; MIMIC-IV-ECG: the "
        "PhysioNet credentialed health data licence, no redistribution outside it).",
        "",
        "## Citation",
        "",
        "```bibtex", CITATION, "```",
        "",
        "## Training configuration", "", "```yaml",
        yaml.safe_dump(train_config, sort_keys=False).rstrip(), "```", "",
    ]
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n" + "\n".join(lines))
