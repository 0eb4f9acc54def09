"""How long a training step waits for its checkpoint: ``train.checkpoint_upload=sync`` vs
``async`` (Ray Train's ``checkpoint_upload_mode``), against a local S3 server (#36).

    python bench/checkpoint_upload.py             # tiny MELP, 2 workers, ZeRO-2, 12 steps, a checkpoint every 2
    python bench/checkpoint_upload.py --smoke     # 4 steps, a checkpoint every 2
    python bench/checkpoint_upload.py --steps 20 --every 4 --modes async

``run.storage_path`` is a bucket of moto's S3 server (``moto[server]``, as
tests/data/test_data_object_store.py) on 127.0.0.1, reached over HTTP through pyarrow's S3
filesystem exactly as AWS or MinIO would be. For each mode one real pretraining run on Ray
Train (the ``tiny`` config on the bundled PTB-XL records, ``train.log_every=1``) checkpoints
every ``--every`` steps. A recipe subclass times, on each rank's training thread, every
``save_checkpoint`` call, split into DeepSpeed's write of the local folder and the report to
Ray Train (sync: the upload to the bucket and the hand-over; async: the hand-over only), the
metrics-only reports of the other steps, and the preemption-notice query asked at every log
step (``train.checkpoint_on_preemption``), and writes them beside the run. The moto server runs in
this process and shares the machine's CPUs with the workers, as a remote S3 would not.
"""
from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import _common as C

BUCKET = "melp-bench"
# Dummy credentials for moto (Ray's workers inherit this process's environment).
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_s3() -> tuple[object, str]:
    """moto's S3 server on a free port, with an empty bucket; (server, host:port)."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    os.environ.update(CREDENTIALS)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"127.0.0.1:{port}"
    pafs.S3FileSystem(endpoint_override=endpoint, scheme="http",
                      allow_bucket_creation=True).create_dir(BUCKET)
    return server, endpoint


def timed_recipe(out_dir: str):
    """PretrainRecipe timing what its training thread spends on checkpoints and reports;
    each rank writes ``timings_r<rank>.json`` into ``out_dir`` at the end."""
    from melp_ray.pretraining.recipe import PretrainRecipe

    class TimedCheckpoints(PretrainRecipe):
        def setup(self):
            super().setup()
            self.timings = {"checkpoints": [], "metric_reports": [], "preemption_queries": []}
            self.last_report_s = 0.0
            report, notice = self.session.report, self.session.preemption_notice

            def timed_report(metrics, checkpoint_folder=None):
                start = time.perf_counter()
                report(metrics, checkpoint_folder=checkpoint_folder)
                self.last_report_s = time.perf_counter() - start
                if checkpoint_folder is None:
                    self.timings["metric_reports"].append(self.last_report_s)

            def timed_notice():
                start = time.perf_counter()
                info = notice()
                self.timings["preemption_queries"].append(time.perf_counter() - start)
                return info

            self.session.report, self.session.preemption_notice = timed_report, timed_notice

        def save_checkpoint(self, metrics):
            start = time.perf_counter()
            super().save_checkpoint(metrics)
            total = time.perf_counter() - start
            self.timings["checkpoints"].append({"step": self.state.step, "total_s": total,
                                                "write_s": total - self.last_report_s,
                                                "report_s": self.last_report_s})

        def cleanup(self):
            super().cleanup()
            Path(out_dir, f"timings_r{self.rank}.json").write_text(json.dumps(self.timings))

    return TimedCheckpoints


def checkpoint_mib(endpoint: str, run_key: str) -> float:
    """Size of the run's newest checkpoint folder in the bucket."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=endpoint, scheme="http")
    prefix = f"{BUCKET}/{run_key}/"
    by_folder: dict[str, int] = {}
    for info in fs.get_file_info(pafs.FileSelector(prefix, recursive=True)):
        folder = info.path.removeprefix(prefix).split("/")[0]
        if info.type == pafs.FileType.File and folder.startswith("checkpoint_step_"):
            by_folder[folder] = by_folder.get(folder, 0) + info.size
    return by_folder[max(by_folder)] / 2**20 if by_folder else float("nan")


def run_mode(mode: str, index: int, args, endpoint: str, tmp: Path) -> dict:
    from melp_ray.config import PretrainConfig, load_config
    from melp_ray.pretraining.run import run

    name = f"upload-{index}-{mode}"      # a run of its own (the same name would resume)
    storage_path = f"s3://{BUCKET}/runs?endpoint_override={endpoint}&scheme=http"
    cfg = load_config(PretrainConfig, "tiny", [
        "data.limit=96", "data.val_fraction=0.2", "train.global_batch_size=8",
        f"train.max_steps={args.steps}", "train.log_every=1", "train.val_every=0",
        "train.val_batches=1", f"train.checkpoint_every={args.every}", "train.keep_checkpoints=2",
        f"train.checkpoint_upload={mode}", "run.max_failures=0",
        f"run.storage_path={storage_path}", f"run.name={name}"])
    out = tmp / name
    out.mkdir()
    start = time.perf_counter()
    summary = run(cfg, recipe_cls=timed_recipe(str(out)))
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("timings_r*.json"))]
    checkpoints = [c for r in ranks for c in r["checkpoints"]]
    # The stall of a step = what its slowest rank waited (the next collective waits for it).
    by_step: dict[int, list[dict]] = {}
    for c in checkpoints:
        by_step.setdefault(c["step"], []).append(c)
    stalls = [max(c["total_s"] for c in cs) for _, cs in sorted(by_step.items())]
    reports = [max(c["report_s"] for c in cs) for _, cs in sorted(by_step.items())]
    writes = [max(c["write_s"] for c in cs) for _, cs in sorted(by_step.items())]
    metric_reports = [t for r in ranks for t in r["metric_reports"]]
    queries = [t for r in ranks for t in r["preemption_queries"]]
    return {"mode": mode, "steps": summary["steps"], "checkpoints": len(stalls),
            "checkpoint_mib": checkpoint_mib(endpoint, f"runs/{name}"),
            "stall_s": stalls, "report_s": reports, "write_s": writes,
            "mean_stall_s": statistics.mean(stalls), "mean_report_s": statistics.mean(reports),
            "mean_write_s": statistics.mean(writes),
            "mean_metric_report_s": statistics.mean(metric_reports) if metric_reports else None,
            "mean_preemption_query_s": statistics.mean(queries) if queries else None,
            "last_checkpoint": summary["last_checkpoint"], "wall_s": wall,
            "train_wall_s": summary["wall_seconds"]}


def main(argv=None) -> int:
    p = C.parser("checkpoint_upload", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps a run (default 12; smoke 4)")
    p.add_argument("--every", type=int, default=2, help="train.checkpoint_every")
    p.add_argument("--modes", default="sync,async", help="train.checkpoint_upload values, in order")
    args = p.parse_args(argv)
    args.steps = args.steps or (4 if args.smoke else 12)
    info = C.machine()
    server, endpoint = start_s3()
    C.log(f"S3 server at {endpoint}; starting Ray ({args.num_cpus} CPUs)")
    ray = C.start_ray(args.num_cpus)
    if args.smoke:
        C.smoke_data_limit()
    runs = []
    with tempfile.TemporaryDirectory(prefix="melp-bench-upload-") as tmp:
        for index, mode in enumerate(args.modes.split(",")):   # e.g. sync,async,sync,async
            C.log(f"train.checkpoint_upload={mode}: {args.steps} steps, a checkpoint every {args.every}")
            runs.append(run_mode(mode, index, args, endpoint, Path(tmp)))
    ray.shutdown()
    server.stop()
    ms = 1000
    rows = [[m["mode"], m["checkpoints"], m["checkpoint_mib"], m["mean_write_s"] * ms,
             m["mean_report_s"] * ms, m["mean_stall_s"] * ms,
             (m["mean_metric_report_s"] or 0) * ms, (m["mean_preemption_query_s"] or 0) * ms,
             m["train_wall_s"]] for m in runs]
    result = {"machine": info, "model": "tiny", "workers": 2, "zero_stage": 2,
              "steps": args.steps, "checkpoint_every": args.every, "runs": runs}
    text = C.table(["checkpoint_upload", "checkpoints", "MiB each", "write ms", "report ms",
                    "step stall ms", "metrics report ms", "preemption query ms", "run wall s"], rows)
    C.finish("checkpoint_upload", args, result, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
