# A stand-in for ministackorg/ministack where no registry is reachable: MiniStack from PyPI
# at the version requirements-emulator.txt pins (the image's tag follows that version), on
# a local Debian base. Built by `scripts/image standins`; used by the container tests only.
ARG BASE=localhost/python-base:bookworm
# The base is a build argument (scripts/image passes the local or a registry base).
# hadolint ignore=DL3006
FROM ${BASE}
ARG MINISTACK_VERSION
RUN python -m venv /opt/ministack \
    && /opt/ministack/bin/pip install --no-cache-dir --disable-pip-version-check \
       "ministack==${MINISTACK_VERSION}"
ENV PATH=/opt/ministack/bin:$PATH \
    GATEWAY_PORT=4566
LABEL org.opencontainers.image.title="MiniStack stand-in" \
      org.opencontainers.image.version="${MINISTACK_VERSION}"
EXPOSE 4566
CMD ["ministack"]
