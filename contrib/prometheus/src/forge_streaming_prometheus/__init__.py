"""Prometheus metrics for forge-streaming, built only on the public hooks.

Installed, it does nothing until a service's config enables it
(``prometheus: {enabled: true}``, with an optional ``prometheus.token``);
then that service serves ``/metrics`` (path set by the ``prometheus.path``
config key). The hooks live in
:mod:`forge_streaming_prometheus.plugin`; :func:`metrics_for` gives the
registry of one service, for apps that want to add their own series.
"""

from __future__ import annotations

from .metrics import StreamingMetrics, metrics_for

__version__ = "0.1.0"
__all__ = ["StreamingMetrics", "__version__", "metrics_for"]
