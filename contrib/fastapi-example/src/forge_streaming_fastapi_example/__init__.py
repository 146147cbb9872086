"""An example FastAPI app with forge-streaming mounted next to its routes; see :mod:`.app`."""

from __future__ import annotations

from .app import TokenAuth, create_app, current_user, user_for_token

__version__ = "0.1.0"
__all__ = ["TokenAuth", "__version__", "create_app", "current_user", "user_for_token"]
