# sfn-dispatcher container image.
#
# Two stages: the builder installs the pinned runtime closure (requirements.lock, with
# hashes) and then the project wheel without dependencies into /opt/venv; the final
# stage is a clean slim Python with only that virtualenv copied in. No compilers, no dev
# extras, no pip cache. Both stages use the same base so the venv's interpreter symlinks
# resolve in the final image.
#
# Reproducible inputs: the base image by full version *and* digest, the build tools (pip,
# setuptools) from requirements-build.txt and the runtime closure from requirements.lock,
# both with --require-hashes, and no build isolation (which would fetch an unpinned
# setuptools). Dependabot (.github/dependabot.yml) keeps the base and the build tools
# current, .github/workflows/lock.yml the lock.
#
#   docker build -t sfn-dispatcher .
#   docker run --rm -p 127.0.0.1:8080:8080 -e DISPATCHER_STATE_MACHINE_ARN=... sfn-dispatcher
#
# The digest is the multi-architecture index of python:3.11.14-slim-bookworm (amd64 and
# arm64 both resolve through it), as recorded by several independent public projects; it
# could not be pulled from this sandbox (no registry access), so the first CI build is the
# check that tag and digest still agree. The base is named once, in a literal FROM (not an
# ARG), because that is the only form Dependabot updates; it bumps tag and digest together.
FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS base

FROM base AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Build tools first, pinned and hashed: the venv's bundled pip is whatever the base shipped.
COPY requirements-build.txt ./
RUN python -m pip install --no-cache-dir --require-hashes --only-binary=:all: \
        -r requirements-build.txt
# Dependencies next: this layer is rebuilt only when the lock file changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
# The project itself as a wheel, without dependencies (the lock file already chose them)
# and without build isolation (that would download a setuptools nobody pinned). Then pip
# and setuptools leave the venv: installers are build tools the service never uses.
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheels . \
    && pip install --no-cache-dir --no-deps /tmp/wheels/*.whl \
    && pip uninstall --yes pip setuptools

FROM base
# Kept equal to pyproject's version by tests/test_containers.py; CI may pass --build-arg.
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="sfn-dispatcher" \
      org.opencontainers.image.description="Cross-execution concurrency limits for AWS Step Functions: one dispatcher starts executions from SQS, never over the limit." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/sfn-dispatcher/sfn-dispatcher"
# A fixed numeric uid/gid so Kubernetes/ECS `runAsNonRoot` can verify it without /etc/passwd.
RUN groupadd --system --gid 10001 dispatcher \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin dispatcher
COPY --from=builder /opt/venv /opt/venv
# DISPATCHER_HTTP_HOST: the default (127.0.0.1) is unreachable from outside a container.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DISPATCHER_HTTP_HOST=0.0.0.0 \
    DISPATCHER_HTTP_PORT=8080 \
    DISPATCHER_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080
# slim has no curl: ask /healthz with the interpreter that is already there.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DISPATCHER_HTTP_PORT', '8080'), timeout=2)"]
# Exec form: the dispatcher is PID 1 and gets SIGTERM itself, then drains and exits.
ENTRYPOINT ["sfn-dispatcher"]
CMD ["run"]
