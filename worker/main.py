"""The Celery app built from the environment, for ``celery -A worker.main worker|beat``."""

from __future__ import annotations

from models.settings import Settings
from worker.app import create_celery

app = create_celery(Settings.from_env())
