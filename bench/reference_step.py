"""The reference MELP's own training step beside ours, same batch, one run: samples/s and
ours / reference (#29: ours >= 1.2x on CPU, fp32, micro-batch 8, paper preset).

    python bench/reference_step.py --reference-repo DIR [--reference-deps DEPS]   # CPU: fp32, micro-batch 8
    python bench/reference_step.py --reference-repo DIR --text-folder T           # CUDA: bf16, micro-batch 64
    python bench/reference_step.py --reference-repo DIR --smoke                   # a short rehearsal

``DIR`` holds two checkouts: ``DIR/MELP`` (GitHub HKU-MedAI/MELP) and ``DIR/fairseq-signals``
(GitHub fuying-wang/fairseq-signals). Their code is imported from there at run time, nothing
of it is part of this repository. The reference's imports need packages melp_ray's
environment lacks; install them into a folder of their own (never into the venv: torch must
stay the venv's), and pass it as ``--reference-deps`` (default: ``DIR/deps`` when present)::

    python -m pip install --target DEPS --no-deps lightning==2.4.0 lightning-utilities==0.11.9 \\
        torchmetrics==1.6.0 timm==1.0.12 torchvision==0.28.0 POT==0.9.5 omegaconf==2.3.0 \\
        hydra-core==1.3.2 antlr4-python3-runtime==4.9.3

(the reference's requirements.txt pins, except torchvision: 0.28.0 is the release built for
torch 2.13, and antlr 4.9.3, which omegaconf 2.3 needs). ``fairseq_signals_backbone`` is
not installed: ``DIR/fairseq-signals/src`` goes on ``sys.path``. Not installable here, and
imported but never called by the reference's training step: ``ipdb`` (called only when the
loss is NaN) and ``cosine_annealing_warmup`` (its scheduler is commented out in
``configure_optimizers``): the script registers an empty stand-in module for each and logs
it. Two import-time shims, also logged, off the timed path: PyPI's torchvision is a CUDA
build whose C extension does not load with a CPU torch, and it then registers fake kernels
for two of its operators unconditionally, so their schemas are declared first;
fairseq-signals was written for Python 3.10, whose dataclasses allowed a dataclass instance
as a field default (3.11 refuses), so that rule is applied while it is imported. One
version alias on the timed path, logged: the reference tokenises with
``tokenizer.batch_encode_plus``, which transformers 5 dropped; its tokenizer gets that name
for its own ``__call__`` (the same batch encoding, no work left out).

What is timed, interleaved (ours, reference, ours, reference, ...) after ``--warmup`` steps
of each, so that load from elsewhere hits both alike:

- ours: the training recipe's own step exactly as ``bench/gpu_step.py`` builds it
  (``build_recipe``: ``PretrainRecipe`` on a world-1 DeepSpeed engine, ``one_batch``,
  ``PretrainRecipe.micro_step``: lead masking, forward, the three losses, ``engine.backward``,
  ``engine.step``), paper preset (``melp_ray/configs/paper.yaml``, 500 Hz), ZeRO ``--stage``;
- the reference: its LightningModule's own methods, called directly (no Lightning
  ``Trainer``): ``MELPModel.training_step`` (``shared_step``: tokenising the report
  strings, its forward, CoCa + beat losses; its ``self.log`` calls are no-ops without a
  Trainer), ``zero_grad``, ``backward``, the AdamW ``step`` and the LR scheduler ``step``
  that its ``configure_optimizers`` returns, then its ``on_train_batch_end`` (the logit
  scale clamp), i.e. what Lightning's automatic optimisation runs per batch. bf16 as
  Lightning's ``bf16-mixed`` (the reference's setting): autocast around ``training_step``.

Same batch: one ``one_batch`` of ``--batch`` rows (bundled PTB-XL reports, random ECGs of
12 leads x 10 s x 500 Hz, min-max normalised); the reference gets the same ECG tensor and the
same report strings (its datamodule hands it strings; it tokenises them in its step), and
the script checks that its tokenisation gives our batch's token ids. Both models at random
init (its ECG-FM weights and hub text model are not available; weights do not change the
cost). The text tower of both is built at random init from one folder: MiniLM's config and
tokenizer (what the paper preset's ``minilm`` resolves to) at width 768 (hidden 768, 12
heads, FFN 3072; 6 layers and the vocabulary kept), because the reference hard-codes the
width 768 (report and sentence projections, multimodal decoder): with MiniLM's own 384 it
does not run. The folder's vocabulary has '.' swapped with id 18, the id the reference
splits sentences at (it is '.' in heart_bert's vocabulary), so its sentence split works as
with its own text model; ours looks the period up. The reference freezes the paper preset's
number of text layers (``text_frozen_layers``). Its decoder's output projection is created
with ``torch.empty`` and never initialised (a reference bug); it is initialised as its own
class's ``init_parameters`` would (normal, std width^-0.5) so that no garbage values
(denormals, NaN) change its cost.

The JSON's top-level ``samples_per_s`` is the reference's (``bench/gpu_suite.py`` divides
``gpu_step``'s samples/s by it); ``ours`` and ``ratio`` hold this run's own comparison.
Exit 2 with one line when ``--reference-repo`` is not given or is not such a folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import types
import warnings
from pathlib import Path

import _common as C
from gpu_step import build_recipe, one_batch, paper_config

TARGET = 1.2
STEADY_SPREAD = 1.3   # slowest / fastest timed step of each, above which a run is flagged
WIDTH_768 = {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072}
REFERENCE_PERIOD_ID = 18      # the token id the reference splits sentences at
STAND_INS = ("ipdb", "cosine_annealing_warmup")


def checkouts(repo: str | None) -> tuple[Path, Path] | None:
    """(MELP's src, fairseq-signals' src) under ``repo``, or None when it is not such a folder."""
    if not repo:
        return None
    melp, signals = Path(repo) / "MELP" / "src", Path(repo) / "fairseq-signals" / "src"
    if (melp / "melp" / "models" / "melp_model.py").is_file() and \
            (signals / "fairseq_signals_backbone" / "models").is_dir():
        return melp, signals
    return None


def deps_folder(args) -> str | None:
    if args.reference_deps:
        return args.reference_deps
    default = Path(args.reference_repo) / "deps"
    return str(default) if default.is_dir() else None


def import_reference(melp_src: Path, signals_src: Path, deps: str | None):
    """The reference's ``melp.models.melp_model``, imported from the checkouts."""
    import torch

    sys.path[:0] = [p for p in (deps, str(melp_src), str(signals_src)) if p]
    for name in STAND_INS:
        if name not in sys.modules:
            try:
                __import__(name)
            except ImportError:
                # Stand-in: imported by the reference, never called on its training step
                # (ipdb.set_trace only on a NaN loss; CosineAnnealingWarmupRestarts is
                # commented out of configure_optimizers).
                module = types.ModuleType(name)
                module.set_trace = lambda *a, **k: None
                module.CosineAnnealingWarmupRestarts = None
                sys.modules[name] = module
                C.log(f"reference: '{name}' not installed: an empty stand-in module (not on the timed path)")
    try:
        import torchvision  # noqa: F401
    except RuntimeError:
        # PyPI's torchvision (a CUDA build) cannot load its C extension with a CPU torch and
        # then registers fake kernels for nms/qnms, which do not exist: declare the two
        # schemas (never called; timm and the reference import torchvision for layer classes).
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        import_reference.torchvision_lib = lib   # keep the fragment alive
        C.log("reference: torchvision's C extension does not load (CUDA build, CPU torch): "
              "declared torchvision::nms/qnms schemas so that it imports (ops never called)")
    with python310_dataclass_defaults():
        import melp.models.melp_model as reference
    return reference


class python310_dataclass_defaults:
    """While importing fairseq-signals: a dataclass instance as a field default is allowed
    (Python 3.10's rule; 3.11 raises "mutable default ... use default_factory"). The field
    gets a factory returning that same instance, which is what 3.10 gave every object."""

    def __enter__(self):
        self.original = original = dataclasses._get_field

        def get_field(cls, name, type_, *rest):
            default = cls.__dict__.get(name, dataclasses.MISSING)
            if (dataclasses.is_dataclass(default) and not isinstance(default, type)
                    and type(default).__hash__ is None):
                setattr(cls, name, dataclasses.field(default_factory=lambda d=default: d))
                self.used = True
            return original(cls, name, type_, *rest)

        self.used = False
        dataclasses._get_field = get_field

    def __exit__(self, *exc):
        dataclasses._get_field = self.original
        if self.used:
            C.log("reference: Python 3.10's dataclass-default rule applied while importing "
                  "fairseq-signals (written for 3.10)")


def text_folder(out: Path, source: str | None, layers: int | None) -> Path:
    """MiniLM's config and tokenizer at width 768 (the reference's hard-coded text width),
    '.' at id 18 (where the reference splits sentences). Random init: no weights."""
    from melp_ray.text.models import resolve_text_model_path

    src = Path(resolve_text_model_path(source or "minilm"))
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    config.update(WIDTH_768)
    if layers:
        config["num_hidden_layers"] = layers
    (out / "config.json").write_text(json.dumps(config, indent=2))
    vocab = (src / "vocab.txt").read_text().splitlines()
    period = vocab.index(".")
    vocab[period], vocab[REFERENCE_PERIOD_ID] = vocab[REFERENCE_PERIOD_ID], vocab[period]
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):   # no tokenizer.json:
        if (src / name).is_file():                                      # it holds the old ids
            shutil.copy(src / name, out / name)
    return out


def our_config(args, folder: Path, device):
    import yaml

    from melp_ray.config import validate_pretrain_config

    cfg = paper_config(args.stage, args.batch, str(folder), args.smoke)
    if not args.smoke:
        cfg.data.seconds = args.seconds
    cfg.train.use_gpu = device.type == "cuda"
    cfg.train.precision = args.precision
    for item in args.ours_set:   # e.g. train.compile=true: a variant of ours, same reference
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not hasattr(getattr(cfg, section, None), name):
            raise SystemExit(f"reference_step: --ours-set {item}: no such config key")
        setattr(getattr(cfg, section), name, yaml.safe_load(value))
    validate_pretrain_config(cfg)
    return cfg


def batch_reports(n: int) -> list[str]:
    """``gpu_step.one_batch``'s report strings (bundled PTB-XL reports, cycled) in the form
    the reference's preprocessing gives its reports: whitespace normalised, a final '.'
    added. (Most PTB-XL reports have no '.'; the reference's beat loss drops a report
    without one and then fails on the shorter list: its data always has one.)"""
    from melp_ray.data.ptbxl import read_database
    from melp_ray.data.sources import bundled_root

    reports = [" ".join(str(r).split()) for r in read_database(bundled_root())["report"]
               if str(r).strip()]
    reports = [r if r.endswith(".") else r + "." for r in reports]
    return [reports[i % len(reports)] for i in range(n)]


def build_reference(reference, cfg, folder: Path, device):
    """The reference ``MELPModel`` with its ECG-FM encoder and a text model built from
    ``folder`` at random init, its optimizer and scheduler from ``configure_optimizers``."""
    import torch
    import transformers

    class RandomInitCausalLM:       # stands in for the hub download of its text model
        @staticmethod
        def from_pretrained(name, **kwargs):
            config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
            return transformers.AutoModelForCausalLM.from_config(config)

    class LocalTokenizer:
        @staticmethod
        def from_pretrained(name, **kwargs):
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
            if not hasattr(tokenizer, "batch_encode_plus"):
                # transformers 5 dropped batch_encode_plus (the reference's, 4.47, ran
                # __call__'s batch path with the same arguments): the same call, renamed.
                def batch_encode_plus(batch_text_or_text_pairs, **kw):
                    return tokenizer(batch_text_or_text_pairs, **kw)
                tokenizer.batch_encode_plus = batch_encode_plus
                C.log("reference: transformers 5 has no batch_encode_plus: aliased to the "
                      "tokenizer's own __call__ (same batch encoding)")
            return tokenizer

    saved = reference.AutoModelForCausalLM, reference.AutoTokenizer
    reference.AutoModelForCausalLM, reference.AutoTokenizer = RandomInitCausalLM, LocalTokenizer
    try:
        m = cfg.model
        model = reference.MELPModel(
            ecg_encoder_name="ecgfm", text_encoder_name="fuyingw/heart_bert",
            max_seq_len=m.max_text_length, n_queries_contrast=m.num_beat_queries,
            clip_loss_weight=cfg.loss.rhythm, caption_loss_weight=cfg.loss.token,
            local_loss_weight=cfg.loss.beat, num_freeze_layers=m.text_frozen_layers,
            lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    finally:
        reference.AutoModelForCausalLM, reference.AutoTokenizer = saved
    with torch.no_grad():   # torch.empty in the reference, never initialised (see docstring)
        proj = model.text_decoder.text_projection
        torch.nn.init.normal_(proj, std=proj.shape[0] ** -0.5)
    model.to(device)
    optimizers, schedulers = model.configure_optimizers()
    return model, optimizers[0], schedulers[0]["scheduler"]


def reference_step(model, optimizer, scheduler, batch: dict, batch_idx: int, autocast) -> float:
    """Lightning's automatic optimisation of one batch, by the module's own methods."""
    model.train()
    with autocast():
        loss = model.training_step(batch, batch_idx)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step()
    model.on_train_batch_end(None, batch, batch_idx)
    return float(loss.detach())


def parameter_counts(params) -> dict:
    params = list(params)
    return {"total": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad)}


def same_tokens(model, reports: list[str], batch: dict) -> dict:
    """The reference's tokenisation of the report strings (``_tokenize``, then the [CLS] its
    ``_encode_text`` appends) against our batch's ids and mask."""
    import torch

    out = model._tokenize(reports)
    cls = torch.full((len(reports), 1), model.tokenizer.cls_token_id, dtype=torch.long)
    ids = torch.cat([out["input_ids"], cls], 1)
    mask = torch.cat([out["attention_mask"], torch.ones_like(cls)], 1)
    ours_ids, ours_mask = batch["input_ids"].cpu(), batch["attention_mask"].cpu()
    return {"input_ids": ids.shape == ours_ids.shape and bool((ids == ours_ids).all()),
            "attention_mask": mask.shape == ours_mask.shape and bool((mask == ours_mask).all()),
            "shape": list(ids.shape)}


def phase_split(recipe, batch, model, optimizer, scheduler, ref_batch, autocast, sync) -> dict:
    """One more step of each, forward+losses / backward / optimizer timed apart (untimed in
    the samples/s): where each step spends its time."""
    from melp_ray.train.augment import seeded_draws

    def clock(fn):
        sync()
        start = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - start, out

    recipe.engine.train()
    gen = seeded_draws(recipe.micro_seed())
    f, losses = clock(lambda: recipe.compute_losses(batch, gen))
    b, _ = clock(lambda: recipe.engine.backward(losses["total"]))
    s, _ = clock(recipe.engine.step)
    recipe.state.micro_in_epoch += 1
    ours = {"forward_losses_s": f, "backward_s": b, "optimizer_s": s}
    model.train()

    def forward():
        with autocast():
            return model.training_step(ref_batch, 1)

    f, loss = clock(forward)
    optimizer.zero_grad()
    b, _ = clock(loss.backward)

    def step():
        optimizer.step()
        scheduler.step()
        model.on_train_batch_end(None, ref_batch, 1)

    s, _ = clock(step)
    return {"ours": ours, "reference": {"forward_losses_s": f, "backward_s": b, "optimizer_s": s}}


def profile_steps(recipe, batch, model, optimizer, scheduler, ref_batch, autocast, top: int) -> dict:
    """One more step of each under ``torch.profiler`` (CPU): the operators with the most
    self time, and each phase's share (the ``record_function`` ranges)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from melp_ray.train.augment import seeded_draws

    def ours():
        recipe.engine.train()
        with record_function("phase: forward + losses"):
            losses = recipe.compute_losses(batch, seeded_draws(recipe.micro_seed()))
        with record_function("phase: backward"):
            recipe.engine.backward(losses["total"])
        with record_function("phase: optimizer"):
            recipe.engine.step()
        recipe.state.micro_in_epoch += 1

    def reference():
        model.train()
        with record_function("phase: forward + losses"), autocast():
            loss = model.training_step(ref_batch, 1)
        optimizer.zero_grad()
        with record_function("phase: backward"):
            loss.backward()
        with record_function("phase: optimizer"):
            optimizer.step()
            scheduler.step()
            model.on_train_batch_end(None, ref_batch, 1)

    out = {}
    for name, fn in (("ours", ours), ("reference", reference)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        averages = prof.key_averages()
        phases = {e.key.removeprefix("phase: "): e.cpu_time_total / 1e6
                  for e in averages if e.key.startswith("phase: ")}
        ops = sorted((e for e in averages if not e.key.startswith("phase: ")),
                     key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[name] = {"phases_s": phases, "events": sum(e.count for e in averages),
                     "top_self_cpu": [{"op": e.key, "calls": e.count,
                                       "self_s": e.self_cpu_time_total / 1e6} for e in ops]}
    return out


def main(argv=None) -> int:
    p = C.parser("reference_step", __doc__.splitlines()[0])
    p.add_argument("--reference-repo", help="folder with checkouts MELP/ (HKU-MedAI/MELP) and "
                                            "fairseq-signals/ (fuying-wang/fairseq-signals)")
    p.add_argument("--reference-deps", help="folder of the reference's extra packages "
                                            "(pip --target; default DIR/deps when present)")
    p.add_argument("--text-folder", help="text model folder (BERT-style config + tokenizer) to "
                                         "widen to 768 for both (default: minilm, as the paper preset)")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help="default: fp32 on CPU, bf16 on a CUDA GPU")
    p.add_argument("--batch", type=int, help="micro-batch (default: 8 on CPU, 64 on a CUDA GPU)")
    p.add_argument("--stage", type=int, default=2, help="our ZeRO stage (paper.yaml: 2)")
    p.add_argument("--seconds", type=int, default=10, help="ECG length (the paper's: 10 s at 500 Hz)")
    # 4: with the training workers' allocator settings (as_a_training_worker) glibc's heap
    # grows to its steady size over ours' first 3 steps; after that no step page-faults.
    p.add_argument("--warmup", type=int, default=4, help="untimed steps of each first")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each, interleaved")
    p.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key of ours on top of the paper preset (e.g. train.compile=true)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="one more step of each under torch.profiler: its N top operators by self CPU time")
    p.add_argument("--no-split", action="store_true",
                   help="skip the extra step of each timed by phase (forward / backward / optimizer)")
    args = p.parse_args(argv)
    sources = checkouts(args.reference_repo)
    if sources is None:
        p.exit(2, f"reference_step: --reference-repo {args.reference_repo or '(not given)'} is "
                  "not a folder with checkouts MELP/ (HKU-MedAI/MELP) and fairseq-signals/ "
                  "(fuying-wang/fairseq-signals)\n")
    import torch

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.batch = args.batch or (64 if cuda else 8)
    if args.smoke:
        args.batch, args.warmup, args.steps = 2, 1, 1   # tiny preset for ours (its ECG length)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    from melp_ray.train.session import single_process_group

    single_process_group("nccl" if cuda else "gloo")   # DeepSpeed's, and the reference's CoCaLoss asks its rank
    info = C.machine()
    deps = deps_folder(args)
    C.log(f"importing the reference from {args.reference_repo} (deps: {deps or 'none'})")
    try:
        reference = import_reference(*sources, deps)
    except ImportError as err:
        p.exit(2, f"reference_step: the reference's imports need a package missing here ({err}): "
                  "install them with pip --target DEPS (see this script's docstring) and pass "
                  "--reference-deps DEPS\n")
    warnings.filterwarnings("ignore", message=".*self.log.*")   # no Trainer: its logging is a no-op
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="melp-refstep-") as tmp:
        folder = text_folder(Path(tmp) / "text", args.text_folder, 1 if args.smoke else None)
        cfg = our_config(args, folder, device)
        C.log(f"ours: {cfg.model.preset} preset, ZeRO-{args.stage}, {args.precision}, micro-batch {args.batch}")
        torch.manual_seed(0)
        recipe = build_recipe(cfg, device)
        reports = batch_reports(args.batch)
        batch = one_batch(cfg, device, reports)
        C.log("reference: building MELPModel (ECG-FM small, text from the same folder)")
        torch.manual_seed(0)
        model, optimizer, scheduler = build_reference(reference, cfg, folder, device)
        tokens = same_tokens(model, reports, batch)
    ref_batch = {"ecg": batch["ecg"], "report": reports}
    if args.precision == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        import contextlib

        autocast = contextlib.nullcontext
    ours_params = parameter_counts(recipe.engine.module.parameters())
    ref_params = parameter_counts(model.parameters())
    C.log(f"parameters: ours {ours_params}, reference {ref_params}; same token ids: {tokens}")

    times: dict[str, list[float]] = {"ours": [], "reference": []}
    losses: dict[str, list] = {"ours": [], "reference": []}
    batch_idx = 1     # the reference generates sample reports at batch_idx % 1000 == 0: not a training cost

    def timed(which: str) -> None:
        nonlocal batch_idx
        sync()
        start = time.perf_counter()
        if which == "ours":
            out = recipe.micro_step(batch)
            recipe.state.micro_in_epoch += 1
        else:
            out = reference_step(model, optimizer, scheduler, ref_batch, batch_idx, autocast)
            batch_idx += 1
        sync()
        times[which].append(time.perf_counter() - start)
        losses[which].append(out)

    for i in range(args.warmup + args.steps):
        for which in ("ours", "reference"):
            timed(which)
            C.log(f"{'warm-up' if i < args.warmup else 'timed'} step {i + 1}: {which} "
                  f"{times[which][-1]:.2f} s")
    unused_by_module: dict[str, int] = {}   # trainable, but no gradient in its step
    for name, param in model.named_parameters():
        if param.requires_grad and param.grad is None:
            key = ".".join(name.split(".")[:3])
            unused_by_module[key] = unused_by_module.get(key, 0) + param.numel()
    unused = sum(unused_by_module.values())
    split = None if args.no_split else phase_split(recipe, batch, model, optimizer, scheduler,
                                                   ref_batch, autocast, sync)
    profiled = None
    if args.profile:
        C.log("profiling one more step of each")
        profiled = profile_steps(recipe, batch, model, optimizer, scheduler, ref_batch, autocast,
                                 args.profile)
    rows = {}
    for which in ("ours", "reference"):
        t = times[which][args.warmup:]
        rows[which] = {"samples_per_s": args.batch * len(t) / sum(t), "step_seconds": sum(t) / len(t),
                       "median_step_seconds": statistics.median(t),
                       "step_seconds_each": t, "warmup_seconds": times[which][: args.warmup]}
    ratio = rows["ours"]["samples_per_s"] / rows["reference"]["samples_per_s"]
    # Of the medians: a step that outside load slowed down weighs less (context, no verdict).
    ratio_median = rows["reference"]["median_step_seconds"] / rows["ours"]["median_step_seconds"]
    # Outside load does not slow both steps alike (measured: the reference's step 2-3x slower
    # under others' jobs, ours less), so a run whose steps spread is flagged, not trusted.
    spread = {w: max(r["step_seconds_each"]) / min(r["step_seconds_each"]) for w, r in rows.items()}
    steady = all(v <= STEADY_SPREAD for v in spread.values())
    verdict = C.check(ratio, TARGET)
    ours_losses = losses["ours"][-1]
    finite = all(map(lambda v: v == v and abs(v) != float("inf"),
                     [*ours_losses.values(), losses["reference"][-1]]))
    result = {
        "machine": info, "device": str(device), "precision": args.precision, "batch": args.batch,
        "seconds": cfg.data.seconds, "sample_rate": cfg.data.sample_rate, "stage": args.stage,
        "warmup": args.warmup, "steps": args.steps, "config": cfg.model.preset,
        "ours_set": args.ours_set,
        "reference_repo": args.reference_repo, "reference_deps": deps,
        "text": {"source": args.text_folder or "minilm", **WIDTH_768,
                 "layers": 1 if args.smoke else None, "pretrained": False,
                 "reference_period_id": REFERENCE_PERIOD_ID},
        "same_tokens": tokens,
        # gpu_suite.py reads the reference's samples/s here:
        "samples_per_s": rows["reference"]["samples_per_s"],
        "ours": rows["ours"], "reference": rows["reference"],
        "ratio": ratio, "ratio_of_medians": ratio_median, "target": TARGET, "verdict": verdict,
        "steady": steady, "step_spread": spread, "steady_spread_limit": STEADY_SPREAD,
        "params": {"ours": ours_params, "reference": ref_params,
                   "reference_trainable_without_gradient": unused,
                   "reference_without_gradient_by_module": unused_by_module},
        "losses_last": {"ours": ours_losses, "reference": losses["reference"][-1]},
        "losses_finite": finite, "phase_split": split, "profile": profiled,
    }
    table_rows = [[w, r["samples_per_s"], r["step_seconds"], r["median_step_seconds"],
                   f"{result['params'][w]['total']:,}", f"{result['params'][w]['trainable']:,}"]
                  for w, r in rows.items()]
    text = C.table(["step", "samples/s", "s/step (mean)", "s/step (median)", "params total",
                    "params trainable"], table_rows)
    diff = ref_params["total"] - ours_params["total"]
    text += (f"\nours / reference = {ratio:.3f} (target >= {TARGET}: {verdict}); "
             f"{args.precision}, micro-batch {args.batch}, {cfg.data.seconds} s at {cfg.data.sample_rate} Hz, "
             f"{args.steps} timed steps each after {args.warmup} warm-up, interleaved; "
             f"ratio of the median steps {ratio_median:.3f}")
    text += (f"\nparameters: the reference holds {diff:+,} more in all, of which {unused:,} are "
             "trainable but get no gradient in its step (see the README)")
    if not steady:
        text += ("\nWARNING: unsteady steps (slowest / fastest: "
                 + ", ".join(f"{w} {v:.2f}" for w, v in spread.items())
                 + f"; limit {STEADY_SPREAD}): outside load; rerun on a quiet machine before "
                 "trusting the ratio")
    text += f"\nsame token ids for both: {tokens['input_ids']}, same attention mask: {tokens['attention_mask']}"
    if split:
        text += "\n" + C.table(["phase (one extra step, s)", "ours", "reference"], [
            [k.removesuffix("_s"), split["ours"][k], split["reference"][k]] for k in split["ours"]])
    if profiled:
        for which, prof in profiled.items():
            text += (f"\n{which}: top operators by self CPU time, one profiled step "
                     f"({prof['events']} operator calls; phases: "
                     + ", ".join(f"{k} {v:.2f} s" for k, v in prof["phases_s"].items()) + ")\n")
            text += C.table(["operator", "calls", "self s"],
                            [[o["op"], o["calls"], o["self_s"]] for o in prof["top_self_cpu"]])
    C.finish("reference_step", args, result, text)
    return 0 if finite else 1


if __name__ == "__main__":
    C.as_a_training_worker()
    raise SystemExit(main())
