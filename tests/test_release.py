"""The release machinery: workflows, Dependabot and the Dockerfile pass their linters, and
the release workflow keeps its promises (tags, platforms, least privilege, no stored tokens).

The linters are the dev extra's binaries (actionlint, hadolint), run offline on the real
files, so CI (which runs this module through `.ci/run`) lints what it runs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
GITHUB = ROOT / ".github"
WORKFLOWS = GITHUB / "workflows"
RELEASE = WORKFLOWS / "release.yml"
CI = WORKFLOWS / "ci.yml"
DEPENDABOT = GITHUB / "dependabot.yml"

FULL_SHA_WITH_VERSION = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40} # v\d+(\.\d+)*$")


def _tool(name: str) -> str:
    """A linter from the dev extra, beside this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    assert found, f"{name} is not installed (it is in the dev extra: pip install -e '.[dev]')"
    return found


def _load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    # YAML 1.1 reads the key `on` as True.
    if True in loaded:
        loaded["on"] = loaded.pop(True)
    return loaded


def _steps(workflow: dict[str, Any], job: str) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = workflow["jobs"][job]["steps"]
    return steps


def _step(workflow: dict[str, Any], job: str, action: str) -> dict[str, Any]:
    (step,) = (s for s in _steps(workflow, job) if s.get("uses", "").startswith(f"{action}@"))
    return step


# -- linters -------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_actionlint_passes_on_every_workflow() -> None:
    workflows = sorted(str(p) for p in WORKFLOWS.glob("*.y*ml"))
    assert {Path(p).name for p in workflows} >= {"ci.yml", "release.yml"}
    result = subprocess.run(
        [_tool("actionlint"), "-no-color", *workflows],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=50,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.timeout(60)
def test_hadolint_passes_on_the_dockerfile() -> None:
    """The image's Dockerfile and the container tests' stand-ins (tests/containers/)."""
    standins = sorted(str(p) for p in ROOT.glob("tests/containers/standins/*.Dockerfile"))
    assert len(standins) == 2
    result = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "info", "Dockerfile", *standins],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=50,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_hadolint_ignore_says_why() -> None:
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        if "hadolint ignore" in line:
            reason = line.split("ignore=", 1)[1].split(None, 1)[1:]
            assert reason, f"ignore without a reason: {line.strip()}"


# -- pins ----------------------------------------------------------------------------------


def _uses() -> list[tuple[str, str]]:
    """(workflow file, `uses:` line with its comment) for every step of every workflow."""
    found = []
    for path in sorted(WORKFLOWS.glob("*.y*ml")):
        for line in path.read_text(encoding="utf-8").splitlines():
            match = re.match(r"^\s*(?:- )?uses:\s*(.+)$", line)
            if match:
                found.append((path.name, " ".join(match.group(1).split())))
    return found


def test_actions_are_pinned_by_full_commit_sha_with_the_version_in_a_comment() -> None:
    uses = _uses()
    assert len(uses) >= 10
    for path, use in uses:
        assert FULL_SHA_WITH_VERSION.match(use), f"{path}: {use!r} is not `owner/repo@<sha> # vX`"


def test_one_action_one_pin() -> None:
    """Two SHAs of one action in different jobs would be a half-done update."""
    pins: dict[str, set[str]] = {}
    for _, use in _uses():
        action, _, ref = use.partition("@")
        pins.setdefault(action, set()).add(ref)
    assert {a: refs for a, refs in pins.items() if len(refs) > 1} == {}


def _hashed_requirements(path: Path) -> dict[str, str]:
    text = path.read_text(encoding="utf-8")
    pins = dict(re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) \\$", text, re.M))
    blocks = re.findall(r"^\S+==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}\s*\\?\n)+)", text, re.M)
    assert pins, f"{path.name} pins nothing"
    assert len(blocks) == len(pins), f"{path.name}: every pin needs a --hash"
    return pins


def test_release_tooling_is_pinned_with_hashes() -> None:
    assert set(_hashed_requirements(GITHUB / "requirements-release.txt")) >= {"build"}
    assert set(_hashed_requirements(ROOT / "requirements-build.txt")) == {"pip", "setuptools"}
    (build,) = (s for s in _steps(_load(RELEASE), "dist") if s.get("name") == "build")
    assert "--require-hashes" in build["run"]
    assert "-r requirements-build.txt -r .github/requirements-release.txt" in build["run"]
    assert "--no-isolation" in build["run"], "isolation would fetch an unpinned setuptools"


def test_dependabot_keeps_every_pin_current() -> None:
    config = _load(DEPENDABOT)
    assert config["version"] == 2
    watched = {(u["package-ecosystem"], u["directory"]) for u in config["updates"]}
    assert watched == {
        ("github-actions", "/"),
        ("docker", "/"),  # the Dockerfile's FROM (tag and digest)
        ("pip", "/"),  # requirements-build.txt (and pyproject's ranges)
        ("pip", "/.github"),  # requirements-release.txt
    }
    # Dependabot's pip updater reads only *requirements*.txt: every pinned file it must
    # keep current is named so; requirements.lock is refreshed by lock.yml instead.
    for path in (ROOT / "requirements-build.txt", GITHUB / "requirements-release.txt"):
        assert re.fullmatch(r".*requirements.*\.txt", path.name)
        assert path.exists()
    for update in config["updates"]:
        assert update["schedule"]["interval"] in {"daily", "weekly"}
    # Dependabot reads the base image only from a literal FROM, never through an ARG.
    froms = [
        line.split()[1]
        for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if line.startswith("FROM ")
    ]
    assert "$" not in froms[0]
    assert "@sha256:" in froms[0]


def test_lock_workflow_refreshes_the_lock_weekly_from_scratch() -> None:
    lock = _load(WORKFLOWS / "lock.yml")
    assert [c["cron"] for c in lock["on"]["schedule"]]
    assert "workflow_dispatch" in lock["on"]
    assert lock["permissions"] == {}
    job = lock["jobs"]["refresh"]
    assert job["permissions"] == {"contents": "write", "pull-requests": "write"}
    runs = [s["run"] for s in job["steps"] if "run" in s]
    # Removing the old lock first, or uv would keep every existing pin.
    assert runs[0].split() == ["rm", "requirements.lock", "make", "lock"]
    assert "git diff --quiet -- requirements.lock" in runs[1]
    assert "gh pr create" in runs[1]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^lock:", makefile, re.M)
    assert "--generate-hashes" in makefile
    assert "--output-file requirements.lock" in makefile


def test_only_the_jobs_that_need_it_may_write() -> None:
    writers = {
        ("release.yml", "image"): {"packages"},
        ("release.yml", "pypi"): {"id-token"},
        ("lock.yml", "refresh"): {"contents", "pull-requests"},
    }
    for path in sorted(WORKFLOWS.glob("*.y*ml")):
        workflow = _load(path)
        assert set(workflow["permissions"].values()) <= {"read"}, path.name
        for name, job in workflow["jobs"].items():
            granted = {k for k, v in job.get("permissions", {}).items() if v == "write"}
            assert granted == writers.get((path.name, name), set()), (path.name, name)


# -- ci ------------------------------------------------------------------------------------


def test_ci_runs_what_the_readme_tells_contributors_to_run() -> None:
    ci = _load(CI)
    assert set(ci["on"]) == {"push", "pull_request"}
    assert ci["permissions"] == {"contents": "read"}
    runs = [s["run"] for job in ci["jobs"] for s in _steps(ci, job) if "run" in s]
    assert runs == [".ci/run"]
    python = _step(ci, "test", "actions/setup-python")["with"]["python-version"]
    floor = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert floor["requires-python"] == f">={python}", "CI tests the oldest supported Python"


# -- release -------------------------------------------------------------------------------


def test_release_runs_on_main_and_version_tags() -> None:
    release = _load(RELEASE)
    assert release["on"] == {"push": {"branches": ["main"], "tags": ["v*"]}}


def test_release_permissions_are_least_privilege_per_job() -> None:
    release = _load(RELEASE)
    assert release["permissions"] == {}, "nothing by default; each job asks for its own"
    jobs = release["jobs"]
    assert jobs["dist"]["permissions"] == {"contents": "read"}
    assert jobs["image"]["permissions"] == {"contents": "read", "packages": "write"}
    assert jobs["pypi"]["permissions"] == {"id-token": "write"}
    for name, job in jobs.items():
        for step in job["steps"]:
            if step.get("uses", "").startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name


def test_no_stored_secret_is_used() -> None:
    """GHCR takes the job's GITHUB_TOKEN; PyPI an OIDC token (trusted publishing)."""
    for path in WORKFLOWS.glob("*.y*ml"):
        secrets = set(re.findall(r"secrets\.(\w+)", path.read_text(encoding="utf-8")))
        assert secrets <= {"GITHUB_TOKEN"}, f"{path.name} uses {secrets}"
    release = _load(RELEASE)
    publish = _step(release, "pypi", "pypa/gh-action-pypi-publish")
    assert not {"password", "user"} & set(publish.get("with", {}))
    assert release["jobs"]["pypi"]["environment"]["name"] == "pypi"


def test_image_is_multi_arch_and_pushed_to_ghcr() -> None:
    release = _load(RELEASE)
    assert _step(release, "image", "docker/setup-qemu-action")["with"]["platforms"] == "arm64"
    _step(release, "image", "docker/setup-buildx-action")
    login = _step(release, "image", "docker/login-action")["with"]
    assert login["registry"] == "ghcr.io"
    assert login["password"] == "${{ secrets.GITHUB_TOKEN }}"  # noqa: S105 - the job's token
    build = _step(release, "image", "docker/build-push-action")["with"]
    assert build["platforms"].split(",") == ["linux/amd64", "linux/arm64"]
    assert build["push"] is True
    assert build["tags"] == "${{ steps.meta.outputs.tags }}"
    assert build["labels"].splitlines() == [
        "${{ steps.meta.outputs.labels }}",
        "org.opencontainers.image.base.name=${{ steps.base.outputs.name }}",
    ]
    meta = _step(release, "image", "docker/metadata-action")
    assert meta["id"] == "meta"
    assert meta["with"]["images"] == "ghcr.io/${{ github.repository }}"


def test_release_builds_the_image_as_make_image_does_before_pushing() -> None:
    """`make image` (scripts/image with docker) first, started hardened; then buildx."""
    steps = _steps(_load(RELEASE), "image")
    (local,) = (i for i, s in enumerate(steps) if "make image" in s.get("run", ""))
    run = steps[local]["run"]
    for flag in ("--read-only", "--cap-drop=ALL", "--user 10001:10001"):
        assert flag in run, flag
    (buildx,) = (
        i for i, s in enumerate(steps) if s.get("uses", "").startswith("docker/setup-buildx")
    )
    assert local < buildx, "after setup-buildx, docker build would not load the image"
    (base,) = (s for s in steps if s.get("id") == "base")
    assert "scripts/image base-name" in base["run"]


def test_image_timestamps_come_from_the_commit() -> None:
    steps = _steps(_load(RELEASE), "image")
    (epoch,) = (i for i, s in enumerate(steps) if "SOURCE_DATE_EPOCH=" in s.get("run", ""))
    assert "git log -1 --pretty=%ct" in steps[epoch]["run"]
    assert '>> "$GITHUB_ENV"' in steps[epoch]["run"]
    (build,) = (
        i for i, s in enumerate(steps) if s.get("uses", "").startswith("docker/build-push-action@")
    )
    assert epoch < build


def test_image_tag_scheme() -> None:
    meta = _step(_load(RELEASE), "image", "docker/metadata-action")["with"]
    assert meta["flavor"].split() == ["latest=false"], "latest only from the rule below"
    assert meta["tags"].splitlines() == [
        "type=semver,pattern={{version}}",  # v1.2.3 -> 1.2.3 (and pre-releases as they are)
        "type=semver,pattern={{major}}.{{minor}}",  # v1.2.3 -> 1.2 (never for pre-releases)
        # latest: release tags only, not v1.2.3-rc.1
        "type=raw,value=latest,enable=${{ startsWith(github.ref, 'refs/tags/v') "
        "&& !contains(github.ref_name, '-') }}",
        "type=sha,prefix=sha-,format=short,enable={{is_default_branch}}",  # main -> sha-abc1234
    ]


def test_pypi_publishes_the_built_dist_on_tags_only_after_the_image() -> None:
    release = _load(RELEASE)
    pypi = release["jobs"]["pypi"]
    assert pypi["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert set(pypi["needs"]) == {"dist", "image"}
    upload = _step(release, "dist", "actions/upload-artifact")["with"]
    download = _step(release, "pypi", "actions/download-artifact")["with"]
    assert upload["name"] == download["name"]
    assert upload["path"] == download["path"] == "dist/"
    assert [s.get("uses", "").split("@")[0] for s in pypi["steps"]] == [
        "actions/download-artifact",
        "pypa/gh-action-pypi-publish",
    ]


def _tag_guard() -> str:
    (step,) = (
        s
        for s in _steps(_load(RELEASE), "dist")
        if s.get("name") == "the tag is the package version"
    )
    assert step["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert step["env"] == {"TAG": "${{ github.ref_name }}"}
    script: str = step["run"]
    return script


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("tag", "accepted"), [("v{version}", True), ("v{version}9", False)])
def test_a_tag_that_is_not_the_package_version_fails_the_release(tag: str, accepted: bool) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    version = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "version"
    ]
    result = subprocess.run(
        [bash, "-eo", "pipefail", "-c", _tag_guard()],
        cwd=ROOT,
        env={"TAG": tag.format(version=version), "PATH": str(Path(sys.executable).parent)},
        capture_output=True,
        text=True,
        check=False,
        timeout=20,
    )
    assert (result.returncode == 0) is accepted, result.stdout + result.stderr
    if not accepted:
        assert f"expected v{version}" in result.stdout
