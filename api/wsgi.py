"""The web entrypoint: `gunicorn api.wsgi:app` (see the Procfile)."""
from api.app import create_app
from shared.logs import configure_logging
from shared.settings import deployment_settings, or_exit

# A half-configured deployment (DATABASE_URL without REDIS_URL, no STEPRUN_SECRET_KEY) stops here, in one line.
settings = deployment_settings("web")
configure_logging(settings)
app = or_exit("web", lambda: create_app(settings))  # and an unsafe database login (shared.runtime)
