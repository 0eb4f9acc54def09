"""Every `python -m melp_ray.X` the README shows is also installed as the console script `melp-X`."""
import importlib
import re

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml (parsed by hand: tomllib is 3.11+, the project supports 3.10)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]\n", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"$', section, flags=re.M))


def readme_modules() -> set[str]:
    text = (REPO / "README.md").read_text()
    for doc in sorted((REPO / "docs").glob("*.md")):
        text += doc.read_text()
    return set(re.findall(r"python -m (melp_ray\.[a-z_]+)", text))


def test_each_documented_command_has_its_console_script():
    scripts = console_scripts()
    expected = {"melp-" + mod.split(".")[1].replace("_", "-"): mod + ":main" for mod in readme_modules()}
    assert expected.items() <= scripts.items()
    for name in ("melp-evaluate", "melp-benchmark", "melp-tune", "melp-export", "melp-convert", "melp-pretrain-text"):
        assert name in scripts


def test_console_script_targets_are_callable_mains():
    readme = (REPO / "README.md").read_text()
    for name, target in console_scripts().items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        assert f"`{name}`" in readme, f"README does not name {name}"
