"""README stays true: its two set-up commands, and CI running the second one verbatim."""
import re

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    top = readme.split("## What is where")[0]
    return re.findall(r"```bash\n(.+?)\n```", top, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    commands = setup_commands()
    assert len(commands) == 2
    install_and_run, install_and_test = commands
    assert install_and_run.endswith("python -m melp_ray.pretrain")
    assert install_and_test.endswith("pytest")
    for cmd in commands:   # torch first, then everything else constrained to it
        assert cmd.index("pip install torch==2.13.0") < cmd.index("-c constraints.txt")
        # With PYTHONDONTWRITEBYTECODE set nothing else writes .pyc files (README "Set up").
        assert "uv pip install --compile-bytecode" in cmd


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert setup_commands()[1] in ci


def test_constraints_pin_the_torch_the_readme_installs():
    pins = (REPO / "constraints.txt").read_text()
    assert "torch==2.13.0" in pins.splitlines()
