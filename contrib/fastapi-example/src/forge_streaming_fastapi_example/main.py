"""The app built with the default config, for ``forge-streaming serve forge_streaming_fastapi_example.main:app``.

Kept apart from :mod:`.app` so that importing the example builds nothing.
"""

from __future__ import annotations

from .app import create_app

app = create_app()
