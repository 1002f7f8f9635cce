"""The install paths the docs give, as a new user runs them: ``pip install "git+URL"`` from a
clone of this repository into a fresh virtualenv, and the wiring-only steps of docs/deploy.md
and the README checked against the template and the settings they name."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dispatcher.settings.config import Settings, env_name
from tests.test_cloudformation import load_template

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DEPLOY = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
WIRING = ROOT / "deploy" / "cloudformation-wiring.yaml"


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    body = text.split(f"\n{heading}\n", 1)[1]
    return re.split(rf"\n{level} ", body, maxsplit=1)[0]


def _blocks(text: str, language: str = "sh") -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def _git(*argv: str, cwd: Path) -> str:
    done = subprocess.run(
        ["git", *argv], cwd=cwd, capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.strip()


@pytest.mark.timeout(400)
def test_the_readmes_pip_install_from_a_git_url_works(tmp_path: Path) -> None:
    """The Install section's line, with a clone of this commit as the URL: the package and
    every module of it, the console script, and its commands (dependencies from PyPI)."""
    [line] = [
        line
        for block in _blocks(_section(README, "## Install"))
        for line in block.splitlines()
        if line.startswith("pip install ")
    ]
    argv = shlex.split(line.split("#", 1)[0])
    [url] = [a for a in argv if a.startswith("git+")]
    commit = _git("rev-parse", "HEAD", cwd=ROOT)
    clone = tmp_path / "clone"
    _git("clone", "--quiet", "--no-checkout", str(ROOT), str(clone), cwd=tmp_path)
    _git("checkout", "--quiet", commit, cwd=clone)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    argv[argv.index(url)] = f"git+file://{clone}@{commit}"
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", *argv[:2], "--quiet", *argv[2:]],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=380,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]
    script = venv / "bin" / "sfn-dispatcher"
    version = subprocess.run(
        [str(script), "--version"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert version.stdout.strip().startswith("sfn-dispatcher "), version.stderr
    for command in ("run", "check", "status", "pause", "redrive", "submit"):
        shown = subprocess.run(
            [str(script), command, "--help"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            check=False,
        )
        assert shown.returncode == 0, (command, shown.stderr[-2000:])
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import dispatcher; print(dispatcher.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    package = Path(where.stdout.strip()).parent
    assert package.is_relative_to(venv), "the installed copy, not this checkout"
    ours = {p.relative_to(ROOT / "dispatcher") for p in (ROOT / "dispatcher").rglob("*.py")}
    theirs = {p.relative_to(package) for p in package.rglob("*.py")}
    assert ours <= theirs, sorted(map(str, ours - theirs))
    assert (package / "py.typed").is_file()
    # The developer tools stay in the checkout: no sandbox, demo or fault proxy installed,
    # and nothing installed only for them (the demo's progress bars).
    site = package.parent
    assert not (site / "devtools").exists(), "developer tools shipped"
    assert not list(site.glob("tqdm*")), "tqdm installed: only the demo uses it"
    dev_command = subprocess.run(
        [str(script), "sandbox", "--help"], cwd=tmp_path, env=env, capture_output=True, check=False
    )
    assert dev_command.returncode == 2, "sandbox is a developer tool: python -m devtools sandbox"


def test_the_wiring_steps_name_real_parameters_outputs_and_settings() -> None:
    section = _section(DEPLOY, "## Wiring only: Kubernetes or any other runtime")
    template = load_template(WIRING.read_text(encoding="utf-8"))
    deploy, run = _blocks(section)
    assert "--template-file deploy/cloudformation-wiring.yaml" in deploy
    overrides = re.findall(r"^\s+([A-Za-z]+)=", deploy, re.M)
    assert overrides, deploy
    assert set(overrides) <= set(template["Parameters"]), overrides
    for output in re.findall(r"`([A-Z][A-Za-z]+(?:Url|Name|Arn))`", section):
        assert output in template["Outputs"], output
    known = {env_name(field) for field in Settings.model_fields}
    named = set(re.findall(r"\bDISPATCHER_[A-Z_]+", section))
    assert named <= known, sorted(named - known)
    assert "sfn-dispatcher check" in run
    assert "sfn-dispatcher run" in run


def test_the_kubernetes_image_override_in_the_docs_is_a_kustomize_images_entry() -> None:
    [block] = _blocks(_section(DEPLOY, "## Kubernetes"), "yaml")
    [entry] = yaml.safe_load(block)["images"]
    kustomization = yaml.safe_load(
        (ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text(encoding="utf-8")
    )
    [container] = kustomization["spec"]["template"]["spec"]["containers"]
    assert container["image"].split(":", 1)[0] == entry["name"]
    assert set(entry) == {"name", "newName", "newTag"}


def test_the_readmes_run_against_aws_names_real_parameters_outputs_and_settings() -> None:
    """The README's few commands against your own AWS resources: the wiring template's
    parameters and outputs, the settings and the commands are all real."""
    section = _section(README, "## Run it against your own AWS resources")
    deploy, run = _blocks(section)
    template = load_template(WIRING.read_text(encoding="utf-8"))
    assert "--template-file deploy/cloudformation-wiring.yaml" in deploy
    overrides = re.findall(r"\b([A-Z][A-Za-z]+)=\$?\w", deploy.split("--parameter-overrides")[1])
    assert overrides, deploy
    assert set(overrides) <= set(template["Parameters"]), overrides
    outputs = re.findall(r"\$\(output ([A-Za-z]+)\)", deploy)
    assert len(outputs) == 4, outputs
    assert set(outputs) <= set(template["Outputs"]), outputs
    known = {env_name(field) for field in Settings.model_fields}
    named = set(re.findall(r"\bDISPATCHER_[A-Z_]+", section))
    assert named <= known, sorted(named - known)
    commands = [line.split()[1] for line in run.splitlines() if line.startswith("sfn-dispatcher")]
    assert commands == ["check", "run", "submit", "status"]
