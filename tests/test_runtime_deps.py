"""lowrax runs with its declared dependencies alone: the README's Quick start and `lowrax generate`
in an environment without the test extra (no torch, peft, bitsandbytes, nor
what they bring, such as jinja2), and without foreign noise on the way."""

from __future__ import annotations

import re

import pytest

from tests.runtime_env import REPO, restricted_site, run_restricted


def readme_quick_start() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return "\n".join(re.findall(r"```python\n(.*?)```", section, re.S))  # every Python block, in order


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return restricted_site(tmp_path_factory.mktemp("runtime-site"))


def test_the_restricted_environment_hides_the_test_extra(site, tmp_path):
    result = run_restricted(site, "import importlib.util as u; print([m for m in ('torch', 'peft', 'bitsandbytes', "
                                  "'pytest') if u.find_spec(m)])", tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_quick_start_and_cli_run_on_the_declared_dependencies(site, tmp_path):
    quick_start = readme_quick_start()
    assert "lowrax.generate(" in quick_start  # the chat-template path that needed jinja2
    cli = (
        "\nfrom lowrax.cli import main\n"
        "assert main(['generate', '--max-new-tokens', '4', 'What is the capital of France?']) == 0\n"
    )  # `lowrax chat` runs there in CI (scripts/check_first_hour.py), in the README's own environment
    result = run_restricted(site, quick_start + cli, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1, 5, 49152)" in result.stdout and "2442240" in result.stdout
    assert (tmp_path / "runs" / "my-adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "runs" / "smollm2-hf" / "model.safetensors").exists()
    assert ">>> What is the capital of France?" in result.stdout
    assert "PyTorch was not found" not in result.stderr  # transformers' advice is noise to lowrax's users


def test_image_processing_runs_on_the_declared_dependencies(site, tmp_path):
    """ViT's inputs (lowrax.ImageProcessor: PIL + numpy) need nothing beyond the declared dependencies."""
    script = ("import numpy as np, lowrax\n"
              "image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)\n"
              "print(lowrax.ImageProcessor(size={'height': 16, 'width': 16})([image]).shape)\n")
    result = run_restricted(site, script, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(1, 3, 16, 16)" in result.stdout
