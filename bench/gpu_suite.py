"""Every GPU number of issue #29 in one call of at most ~8 minutes, one JSON.

    python bench/gpu_suite.py --text-folder DIR [--reference-repo DIR]   # one CUDA GPU
    python bench/gpu_suite.py --smoke                                     # CPU code path (CI)

GPU time is scarce (a lent machine, minutes, start-up included), so the parts run in order
of value, each in its own process with what is left of ``--budget-s`` as its limit, and a
part that does not fit is recorded as "not run (budget)" instead of being guessed:

1. ``step``: ``bench/gpu_step.py`` (the recipe's step without Ray), ZeRO-1, micro-batch 64;
2. ``throughput``: ``bench/gpu_throughput.py`` (Ray Data -> Ray Train -> DeepSpeed), ZeRO-1
   and 2, samples/s and input wait; ``ray_over_step`` = its samples/s over 1.'s, same stage;
3. ``largest_batch``: ``gpu_step`` at 128, 256, 512 until one does not fit (out of memory);
4. ``reference``: with ``--reference-repo``, ``bench/reference_step.py`` (the reference
   MELP's own step, same batch, bf16) when that script is present, and ours / reference.

"before": the step measured before the #29 changes (``bench/results/gpu_step.json``: its
date, GPU and command are in that file) beside this run's ``step``. Without a GPU every
row but ``--smoke``'s is refused by the parts themselves (exit 2): nothing is estimated.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C

BENCH = Path(__file__).resolve().parent
BEFORE = BENCH / "results" / "gpu_step.json"
LARGER_BATCHES = (128, 256, 512)
OUT_OF_MEMORY = ("out of memory", "OutOfMemoryError")


class Budget:
    """Seconds left of the whole run, handed to each part as its timeout."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_part(script: str, args: list[str], out: Path, budget: Budget) -> dict:
    """``python bench/<script> ... --out out`` within the budget: its JSON, or why not."""
    left = budget.left()
    if left < 30:
        return {"status": "not run (budget)"}
    cmd = [sys.executable, str(BENCH / script), *args, "--out", str(out)]
    C.log(f"{script} {' '.join(args)} (limit {left:.0f} s)")
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=left)
    except subprocess.TimeoutExpired:
        return {"status": "timed out (budget)", "command": " ".join(cmd[1:])}
    seconds = time.monotonic() - start
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        status = "out of memory" if any(m in tail for m in OUT_OF_MEMORY) else f"exit {proc.returncode}"
        return {"status": status, "seconds": seconds, "command": " ".join(cmd[1:]), "tail": tail}
    return {"status": "ok", "seconds": seconds, "command": " ".join(cmd[1:]),
            "result": json.loads(out.read_text())}


def largest_batch(common: list[str], work: Path, budget: Budget) -> dict:
    """ZeRO-1 at growing micro-batches until one fails or the budget ends."""
    tried = {}
    for batch in LARGER_BATCHES:
        part = run_part("gpu_step.py", [*common, "--stages", "1", "--batch", str(batch)],
                        work / f"step_b{batch}.json", budget)
        tried[str(batch)] = part
        if part["status"] != "ok":
            break
    fitted = [int(b) for b, p in tried.items() if p["status"] == "ok"]
    return {"tried": tried, "largest": max(fitted) if fitted else None}


def stage_rows(step: dict, throughput: dict) -> tuple[dict | None, dict | None]:
    """The step's and the Ray path's rows at the lowest ZeRO stage both measured (1 on a
    GPU; the smoke's Ray path runs stage 2 only)."""
    step_stages = step["result"]["stages"] if step.get("status") == "ok" else {}
    ray_stages = throughput["result"]["stages"] if throughput.get("status") == "ok" else {}
    both = sorted(set(step_stages) & set(ray_stages))
    stage = both[0] if both else "1"
    return step_stages.get(stage), ray_stages.get(stage)


def before_row() -> dict | None:
    """The step as measured before the #29 changes, with where and when."""
    if not BEFORE.is_file():
        return None
    data = json.loads(BEFORE.read_text())
    row = data["stages"].get("1", {})
    return {"date": data["machine"]["date"], "gpu": data["machine"].get("gpu"),
            "batch": data["batch"], "samples_per_s": row.get("samples_per_s"),
            "mfu": row.get("mfu"), "file": str(BEFORE.relative_to(BENCH.parent))}


def ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if not numerator or not denominator or not denominator.get("samples_per_s"):
        return None
    return numerator["samples_per_s"] / denominator["samples_per_s"]


def main(argv=None) -> int:
    p = C.parser("gpu_suite", __doc__.splitlines()[0])
    p.add_argument("--text-folder", help="BERT-style config.json + tokenizer: the text tower "
                                         "at random init (weights do not change the cost)")
    p.add_argument("--reference-repo", help="checkout of the reference MELP (with fairseq-signals)")
    p.add_argument("--budget-s", type=float, default=450, help="the whole run's limit (s)")
    args = p.parse_args(argv)
    budget = Budget(args.budget_s)
    info = C.machine()
    common = ["--smoke"] if args.smoke else []
    if args.text_folder:
        common += ["--text-folder", args.text_folder]
    with tempfile.TemporaryDirectory(prefix="melp-gpu-suite-") as tmp:
        work = Path(tmp)
        # The smoke runs every stage of the step (the stages must agree); a GPU run ZeRO-1.
        step = run_part("gpu_step.py", [*common, "--stages", "1,2,3" if args.smoke else "1"],
                        work / "step.json", budget)
        throughput = run_part("gpu_throughput.py", [*common, "--stages", "1,2"],
                              work / "throughput.json", budget)
        larger = ({"status": "not run (smoke)"} if args.smoke
                  else largest_batch(common, work, budget))
        if args.reference_repo and (BENCH / "reference_step.py").is_file():
            reference = run_part("reference_step.py",
                                 [*common, "--reference-repo", args.reference_repo],
                                 work / "reference.json", budget)
        else:
            reference = {"status": "not run (no --reference-repo, or no bench/reference_step.py)"}
    ours, ray_path = stage_rows(step, throughput)
    result = {
        "machine": info, "budget_s": args.budget_s, "text_folder": args.text_folder,
        "before": before_row(), "step": step, "throughput": throughput,
        "largest_batch": larger, "reference": reference,
        # A CPU smoke beside a GPU "before" would be a ratio of nothing.
        "ratios": {"step_over_before": None if args.smoke else ratio(ours, before_row()),
                   "ray_over_step": ratio(ray_path, ours),
                   "ours_over_reference": ratio(ours, reference.get("result"))},
    }
    rows = [["before (" + (result["before"] or {}).get("date", "n/a") + ")",
             (result["before"] or {}).get("samples_per_s"), (result["before"] or {}).get("mfu"), ""],
            ["step (no Ray)", ours and ours["samples_per_s"], ours and ours["mfu"], step["status"]],
            ["Ray path", ray_path and ray_path["samples_per_s"],
             ray_path and ray_path["mfu"], throughput["status"]]]
    text = C.table(["part", "samples/s", "MFU", "status"],
                   [[c if c is not None else "not run" for c in row] for row in rows])
    text += "\nratios: " + ", ".join(f"{k} {v:.3g}" if v is not None else f"{k} not run"
                                     for k, v in result["ratios"].items())
    C.finish("gpu_suite", args, result, text)
    return 0 if step["status"] == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
