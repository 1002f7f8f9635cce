# A stand-in for prom/prometheus where no registry is reachable: Debian's `prometheus`
# package on a local Debian base, laid out like the upstream image (config in
# /etc/prometheus, data in /prometheus, user nobody, wget for compose's healthcheck).
# Built by `scripts/image standins`; used by the container tests only.
ARG BASE=localhost/python-base:bookworm
# The base is a build argument (scripts/image passes the local or a registry base).
# hadolint ignore=DL3006
FROM ${BASE}
# Unpinned: the stand-in follows Debian bookworm's package, as the base does.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends prometheus wget \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /prometheus \
    && chown nobody:nogroup /prometheus
LABEL org.opencontainers.image.title="Prometheus stand-in (Debian package)"
# nobody (65534), as in the upstream image.
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
