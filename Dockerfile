# mta: outbound SMTP relay enforcing MTA-STS.
#   docker build -t mta .
#   docker run -d -p 2525:2525 -v mta-spool:/var/spool/mta -v $PWD/config.toml:/etc/mta/config.toml:ro mta
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mta ./mta
RUN pip install --no-cache-dir . \
    && useradd --system --uid 10025 --home-dir /var/spool/mta --shell /usr/sbin/nologin mta \
    && mkdir -p /var/spool/mta /etc/mta \
    && chown mta:mta /var/spool/mta

# A container default: listen on all interfaces inside the container, spool on the volume.
# Relaying stays limited to relay_networks (loopback by default): set it to your clients' network.
COPY config.example.toml /etc/mta/config.toml
RUN sed -i -e 's|^listen = \["127.0.0.1:2525"\]|listen = ["0.0.0.0:2525"]|' \
           -e 's|^path = "queue"|path = "/var/spool/mta"|' \
           -e 's|^cache_path = "queue/sts-cache.db"|cache_path = "/var/spool/mta/sts-cache.db"|' \
           -e 's|^db_path = "queue/tlsrpt.db"|db_path = "/var/spool/mta/tlsrpt.db"|' /etc/mta/config.toml

USER mta
VOLUME ["/var/spool/mta"]
EXPOSE 2525
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8025/readyz', timeout=4)" || exit 1
ENTRYPOINT ["mta"]
CMD ["serve", "--config", "/etc/mta/config.toml"]
