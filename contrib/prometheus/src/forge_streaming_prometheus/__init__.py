"""Prometheus metrics for forge-streaming, built only on the public hooks.

Installed, it does nothing until a service's config enables it
(``prometheus: {enabled: true}``, with an optional ``prometheus.token``);
then that service serves ``/metrics`` (path set by the ``prometheus.path``
config key). The hooks live in
:mod:`forge_streaming_prometheus.plugin`; :func:`metrics_for` gives the
registry of one service, for apps that want to add their own series.

prometheus-client is imported with :mod:`~forge_streaming_prometheus.metrics`,
when a service enables the plugin or a name from it is first used, not when
the plugin loads: every ``Streaming()`` loads every installed plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .metrics import StreamingMetrics, metrics_for

__version__ = "0.1.0"
__all__ = ["StreamingMetrics", "__version__", "metrics_for"]


def __getattr__(name: str) -> Any:
    if name in ("StreamingMetrics", "metrics_for"):
        from . import metrics

        return getattr(metrics, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
