"""The Origin check done before the upgrade (cross-site WebSocket hijacking).

The rule is the kernel's, shared by every transport:
:func:`forge_streaming.origin_allowed`. This module keeps the name where
this plugin has always had it.
"""

from __future__ import annotations

from forge_streaming import origin_allowed

__all__ = ["origin_allowed"]
