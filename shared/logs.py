"""Logging setup, done by each entrypoint (never at import)."""
from __future__ import annotations

import logging

from shared.settings import Settings


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(process)d: %(message)s",
    )
