"""The import contract of the package (docs/architecture.md, "Layers"): melp_ray's parts stand
on layers, and a module imports only from its own part or from the parts below it; no
modules import each other in a circle. Read from the source with ``ast`` (nothing is
imported), counting imports inside functions too: a deferred import is a dependency all the
same."""
from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "melp_ray"

# Bottom to top: melp_ray.<part> for each package or top-level module. One line = one layer.
LAYERS = [
    ["utils"],                      # storage, distributed, console, Ray connection, cluster checks
    ["data"],                       # readers, records, shards, rows per rank, the shard pipeline
    ["text"],                       # report token ids, offline text models, prompts
    ["model"],                      # the MELP model and its losses (no Ray)
    ["config_parsing"],
    ["config_sections"],            # the config sections (data, loss, train, ...) and their checks
    ["config"],                     # the whole pretraining config, loaded and checked
    ["hub"],                        # checkpoints, Hugging Face export, the official weights
    ["train"],                      # the Ray Train + DeepSpeed machinery, data streams, curves
    ["eval"],                       # what evaluates: embeddings, zero-shot, probe, metrics
    ["eval_plan"],                  # what plans and reports: options, plans, runs, suite, tables
    ["text_mlm"],                   # stage 1 (recipe on train/)
    ["pretraining"],                # stage 2: PretrainRecipe and run()
    ["sweeps"],                     # Ray Tune over pretraining.run
    ["prepare", "pretrain", "pretrain_text", "evaluate", "benchmark", "tune", "export", "convert",
     "cluster", "plot"],           # the other entry points: argument parsing and a call
]
FACE = "__init__"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == FACE else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The melp_ray module that ``name`` (a module, or a name inside one) refers to."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imported(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """melp_ray modules that ``module`` imports anywhere in its body."""
    package = module if path.name == f"{FACE}.py" else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            target = resolve(name, known) if name.startswith("melp_ray") else None
            if target and target != module and target != "melp_ray":
                out.add(target)
    return out


@functools.cache
def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imported(m, p, known) for m, p in known.items()}


def part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def layer_of() -> dict[str, int]:
    return {name: i for i, names in enumerate(LAYERS) for name in names}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of two or more modules (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {part(m) for m in modules()} - {"melp_ray"}
    assert sorted(parts - set(layer_of())) == []
    assert sorted(set(layer_of()) - parts) == [], "a layer names a part that is gone"


def test_no_import_reaches_up_a_layer():
    layers = layer_of()
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if layers.get(part(b), -1) > layers.get(part(a), len(LAYERS)))
    assert upward == []


def test_no_modules_import_each_other_in_a_circle():
    assert circles(import_graph()) == []


def test_the_checker_sees_a_circle_and_an_upward_import():
    graph = {"melp_ray.a": {"melp_ray.b"}, "melp_ray.b": {"melp_ray.a"}, "melp_ray.c": set()}
    assert circles(graph) == [["melp_ray.a", "melp_ray.b"]]
    known = modules()
    graph = import_graph()
    assert "melp_ray.hub.checkpoint" in graph["melp_ray.train.init_from"]   # a deferred import counts
    assert layer_of()["data"] < layer_of()["hub"] and "melp_ray.data.prepare" in known


def test_top_level_holds_entry_points_config_and_the_face():
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    entry_points = set(LAYERS[-1])
    assert set(top) == entry_points | {"config", "config_sections", "config_parsing", FACE}


def test_readme_table_names_every_part_and_only_paths_that_exist():
    readme = (REPO / "README.md").read_text()
    table = readme.split("## What is where")[1].split("\n\n")[1]
    paths = set(re.findall(r"`(melp_ray/[\w/.]*)`", table))
    assert sorted(p for p in paths if not (REPO / p).exists()) == []
    named = {p.split("/")[1].removesuffix(".py") for p in paths}
    assert sorted({part(m) for m in modules()} - named - {"melp_ray", FACE}) == []
