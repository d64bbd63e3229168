"""The operator's web console at /console (DESIGN section 12): server-rendered pages, a little JavaScript."""
from api.console.views import bp

__all__ = ["bp"]
