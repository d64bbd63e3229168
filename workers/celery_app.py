"""The worker entrypoint: `celery -A workers.celery_app worker -P gevent ...` (see the Procfile).

Celery has monkey-patched the standard library for the gevent pool before it
imports this module; what that leaves blocking is patched here, first
(workers/patches.py). The app itself is built in workers/app.py, from the
settings read here, the only place the worker reads its environment.
"""
from __future__ import annotations

from shared.settings import deployment_settings
from workers.app import create_celery
from workers.patches import apply_gevent_patches

apply_gevent_patches()
app = create_celery(deployment_settings("worker"))
