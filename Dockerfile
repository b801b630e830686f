# mta: outbound SMTP relay enforcing MTA-STS. Quick start and settings: README.md, "Container".
#   podman build --format docker -t mta .        (or: docker build -t mta .)
# Debian's own Python on debian:bookworm-slim, so `make container-test` builds this very file on a
# base made with debootstrap (tests/container/build.sh), without Docker Hub.
FROM debian:bookworm-slim AS base
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

# Build stage: our pip install goes into a venv (never into Debian's Python, PEP 668); only the
# venv, without pip and setuptools, goes into the image.
FROM base AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Dependencies first, in their own layer: a code change does not download them again.
COPY pyproject.toml ./
RUN python3 -m venv /opt/mta \
    && python3 -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('requirements.txt', 'w').write('\n'.join(deps))" \
    && /opt/mta/bin/pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY mta ./mta
RUN /opt/mta/bin/pip install --no-cache-dir --no-deps . \
    && /opt/mta/bin/pip uninstall --yes --quiet setuptools pip
# Marks this stage's images, kept as build cache; `make container-clean` removes them.
LABEL mta.stage=build

FROM base
RUN useradd --system --user-group --uid 10025 --home-dir /var/spool/mta --shell /usr/sbin/nologin mta \
    && mkdir -p /var/spool/mta /etc/mta \
    && chown mta:mta /var/spool/mta
COPY --from=build /opt/mta /opt/mta
# Applications that call sendmail (issue 12) find mta's console script where they look for it.
RUN ln -s /opt/mta/bin/sendmail /usr/sbin/sendmail
COPY deploy/container/config.toml /etc/mta/config.toml
# MTA_CONFIG: `docker exec ... mta queue list` and sendmail find the config without --config.
ENV PATH=/opt/mta/bin:$PATH MTA_CONFIG=/etc/mta/config.toml
WORKDIR /var/spool/mta
USER mta
VOLUME ["/var/spool/mta"]
EXPOSE 2525 8025
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["python3", "-m", "mta.healthcheck"]
ENTRYPOINT ["mta"]
CMD ["serve"]
