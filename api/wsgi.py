"""The web entrypoint: `gunicorn api.wsgi:app` (see the Procfile)."""
from api.app import create_app
from shared.logs import configure_logging
from shared.settings import Settings

settings = Settings.from_env()
configure_logging(settings)
app = create_app(settings)
