# orgsync: one image for every role (web, apply and clerk workers, beat, migrate); docker-compose.yml picks the command.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ORGSYNC_DATA_DIR=/var/lib/orgsync

WORKDIR /app
COPY pyproject.toml README.md LICENSE ./
COPY orgsync ./orgsync
COPY models ./models
COPY webhooks ./webhooks
COPY worker ./worker
COPY emulator ./emulator
COPY api ./api
COPY console ./console
RUN pip install . \
    && useradd --system --home-dir /var/lib/orgsync --create-home orgsync \
    && install -d -o orgsync /var/lib/orgsync/metrics

# Beat keeps its schedule file in ORGSYNC_DATA_DIR, which must be writable; metrics/ in it is
# the metrics files' directory (a volume shared by the web and worker containers in compose).
USER orgsync
WORKDIR /var/lib/orgsync
EXPOSE 8000
CMD ["orgsync", "serve", "--host", "0.0.0.0", "--port", "8000"]
