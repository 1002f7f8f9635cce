"""The built image, run the way ECS and Kubernetes run it, against the sandbox emulator.

Hardened: uid 10001, a read-only root filesystem, every capability dropped, no new
privileges. On the host's network (the emulator listens on loopback), the dispatcher's HTTP
server on 127.0.0.1 and a free port. The limit is judged from the executions' own records,
SIGTERM must end it with exit code 0 well inside ECS's 30 s stop timeout, and a second
container then finishes the work: every request started exactly once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.polling import wait_until
from devtools.records import list_executions
from devtools.sandbox import free_port
from devtools.sandbox.provision import SandboxResources
from tests.audit import send_requests, verdict, workload
from tests.containers.engine import (
    Engine,
    containers,
    http_get,
    report,
    requires_container_tests,
    until,
)
from tests.helpers import depth, session

pytestmark = [requires_container_tests]

HARDENED = (
    "--read-only",
    "--cap-drop=ALL",
    "--user",
    "10001:10001",
    "--security-opt",
    "no-new-privileges",
)
LIMIT = 3
REQUESTS = 24
STOP_TIMEOUT = 30  # ECS's default stopTimeout: SIGKILL after this
STOP_WITHIN = 20  # what "well inside" means here: the default shutdown_timeout, not more
COMPILERS = ("gcc", "cc", "c++", "g++", "clang", "tcc", "ld", "as", "make")
INSTALLERS = ("pip", "pip3", "pip3.11", "easy_install", "uv")
# Added by the image over its base: the project's virtualenv and its labels, not much more.
MAX_ADDED_MB = 100

# Run in the image and in its base: what is on PATH and what the interpreter can import.
PROBE = """
import importlib.util, json, os, shutil, sys, hashlib, glob
bundle = "/etc/ssl/certs/ca-certificates.crt"
print(json.dumps({
    "on_path": sorted(n for n in %r if shutil.which(n)),
    "pip_importable": importlib.util.find_spec("pip") is not None,
    "setuptools_importable": importlib.util.find_spec("setuptools") is not None,
    "venv_installers": sorted(os.path.basename(p) for p in glob.glob(
        "/opt/venv/lib/python3*/site-packages/*") if os.path.basename(p).split("-")[0]
        in ("pip", "setuptools", "wheel")),
    "ca_bundle": hashlib.sha256(open(bundle, "rb").read()).hexdigest()
        if os.path.exists(bundle) else None,
    "certs": sorted(os.listdir("/etc/ssl/certs")) if os.path.isdir("/etc/ssl/certs") else [],
}))
""" % (COMPILERS + INSTALLERS,)  # noqa: UP031 - a script's literal, not a message


def _probe(engine: Engine, image: str) -> dict[str, Any]:
    result = engine(
        "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", PROBE
    )
    return dict(json.loads(result.stdout))


def test_the_image_carries_nothing_of_its_build(engine: Engine, image: str) -> None:
    """No compilers, no pip, no build-time certificates or settings; its size over its base."""
    config = engine.inspect(image, "image")
    base = config["Config"]["Labels"]["org.opencontainers.image.base.name"]
    base_config = engine.inspect(base, "image")
    added = (config["Size"] - base_config["Size"]) / 1e6
    report(f"image {image}: {config['Size'] / 1e6:.0f} MB, {added:.1f} MB over its base {base}")
    assert added < MAX_ADDED_MB, f"the image adds {added:.0f} MB over {base}"

    assert config["Config"]["User"] == "10001:10001"
    env = [v.split("=", 1)[0] for v in config["Config"]["Env"]]
    leaked = [
        v for v in env if v.startswith(("PIP_", "REQUESTS_", "SSL_", "CURL_")) or "PROXY" in v
    ]
    assert not leaked, f"build settings in the image's environment: {leaked}"
    assert "PIP_NO_CACHE_DIR" not in env  # the builder stage's ENV stays in the builder
    history = " ".join(engine.history(image))
    for word in ("ssl/certs", "PIP_CERT", "REQUESTS_CA_BUNDLE", "--volume", "proxy"):
        assert word not in history, f"{word!r} in the image's history"

    inside, underneath = _probe(engine, image), _probe(engine, base)
    assert not [n for n in inside["on_path"] if n in COMPILERS], inside["on_path"]
    assert not inside["pip_importable"], "the image's python can import pip"
    assert not inside["setuptools_importable"], "the image's python can import setuptools"
    assert inside["venv_installers"] == [], inside["venv_installers"]
    # An installer the base itself carries (python:*-slim has pip) is the base's, not ours.
    assert set(inside["on_path"]) <= set(underneath["on_path"]), inside["on_path"]
    # The host's CAs were mounted for the build only: the image has its base's.
    assert inside["ca_bundle"] == underneath["ca_bundle"], "the build's CA bundle stayed"
    assert inside["certs"] == underneath["certs"], "the build's certificates stayed"


def _pid1(engine: Engine, container: str) -> dict[str, str]:
    """The dispatcher's own /proc status lines (uid, gid, capabilities)."""
    status = engine("exec", container, "cat", "/proc/1/status").stdout
    return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)


@pytest.mark.timeout(300)
async def test_the_hardened_image_serves_under_the_limit_and_stops_cleanly_on_sigterm(
    engine: Engine, image: str, sandbox_factory: Any, tmp_path: Path
) -> None:
    resources: SandboxResources = await sandbox_factory(limit=LIMIT)
    port = free_port()
    env = {
        **resources.env(),
        "DISPATCHER_HTTP_HOST": "127.0.0.1",
        "DISPATCHER_HTTP_PORT": str(port),
        # The emulator lists a start at once: a short start-up wait, as in `make demo`.
        "DISPATCHER_START_GRACE": "1",
    }
    env_file = tmp_path / "dispatcher.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()), encoding="utf-8")
    run = ("run", "--detach", "--network", "host", *HARDENED, "--env-file", str(env_file), image)
    base = f"http://127.0.0.1:{port}"

    async with (
        session().client("sqs", endpoint_url=resources.endpoint) as sqs,
        session().client("stepfunctions", endpoint_url=resources.endpoint) as sfn,
    ):
        names = await send_requests(sqs, resources.request_queue_url, workload(REQUESTS, 1, 3))

        async def some_started() -> bool:
            executions = await list_executions(sfn, resources.state_machine_arn)
            return len(executions) >= 2 * LIMIT

        with containers(engine) as started:
            first = engine(*run).stdout.strip()
            started.append(first)
            until("/healthz answers 200", lambda: http_get(f"{base}/healthz")[0] == 200, 60)
            until("/readyz answers 200", lambda: http_get(f"{base}/readyz")[0] == 200, 60)

            status = _pid1(engine, first)
            assert status["Uid"].split()[:2] == ["10001", "10001"], status["Uid"]
            assert status["Gid"].split()[:2] == ["10001", "10001"], status["Gid"]
            for capabilities in ("CapEff", "CapPrm", "CapBnd"):
                assert int(status[capabilities], 16) == 0, (capabilities, status[capabilities])
            assert status["NoNewPrivs"].strip() == "1"
            write = engine("exec", first, "touch", "/probe", check=False)
            assert write.returncode != 0, "the root filesystem is writable"
            assert "Read-only file system" in write.stderr

            await wait_until(some_started, within=90)
            before = time.monotonic()
            engine("stop", "--time", str(STOP_TIMEOUT), first, timeout=STOP_TIMEOUT + 30)
            took = time.monotonic() - before
            report(f"SIGTERM -> exit in {took:.1f} s (ECS stops after {STOP_TIMEOUT} s)")
            logs = engine.logs(first)
            assert engine.exit_code(first) == 0, logs[-3000:]
            assert took < STOP_WITHIN, f"stopped after {took:.1f} s"
            assert '"dispatcher.stopped"' in logs, logs[-3000:]

            # Nothing lost: a second container finishes the rest, each request exactly once.
            second = engine(*run).stdout.strip()
            started.append(second)
            await verdict(resources, names, LIMIT, within=180)
            assert await depth(sqs, resources.dead_letter_queue_url) == 0
            engine("stop", "--time", str(STOP_TIMEOUT), second, timeout=STOP_TIMEOUT + 30)
            assert engine.exit_code(second) == 0, engine.logs(second)[-3000:]
