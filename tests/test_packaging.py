"""Packaging promises: bare imports refused, light `import mmgrpo`, README and CI in step."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["pipelines", "rewards", "configs", "assets"])
def test_bare_import_is_refused_with_a_hint(name):
    out = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0
    assert f"import it as 'mmgrpo.{name}'" in out.stderr


def test_import_mmgrpo_is_light():
    code = "import sys, mmgrpo; print(any(m.startswith(('torch', 'accelerate', 'diffusers')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.stdout.strip() == "False"


def test_configs_are_package_data():
    from mmgrpo.config import config_dir

    assert (config_dir() / "toy.yaml").is_file()


def _readme_block(marker):
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- {marker} -->\s*```(?:bash|sh)\n(.+?)\n```", text, re.S)
    assert match, f"README.md has no command block marked <!-- {marker} -->"
    return match.group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_block("test-command")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci  # .ci/run extracts and runs the README block itself
    assert "pytest" in command and "pip install" in command


def test_readme_main_command_runs_the_main_job():
    """The product's main job: text-to-video GRPO on the embedded default, with the extra it needs."""
    command = _readme_block("main-command")
    assert "mmgrpo train --modality video" in command and 'pip install -e ".[video]"' in command


def test_readme_api_example_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- api-example -->\s*```python\n(.+?)\n```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    assert result.eval["after"]["reward/mean"] > result.eval["before"]["reward/mean"]
    assert (tmp_path / "runs" / "api-example" / "eval.json").is_file()


def test_every_source_package_is_in_the_wheel():
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = set()
    for name, folder in setup["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(ROOT / folder).parts]))
    assert found == listed  # a package missing here is missing from a clean install's wheel
    assert not any(part == "build" for name in listed for part in name.split("."))  # tools skip build/ folders
