"""From a resolved record to a span (resolver thread): which records become spans, with which ids, and what
they carry.

* ``attributes.py``: every attribute name otel-npu writes (spans and metrics), the span limits, and the checks
  of what the user gave (attributes, links);
* ``identity.py``: trace and span ids, parents, and the sampler's decision;
* ``render.py``: ``SpanFactory``, the decisions one pipeline's sinks share, and the SDK rendering;
* ``sampling.py``: which steps are exported besides the sampler's (slow steps, steps with detail).
* ``sdk.py``: the OpenTelemetry SDK's trace package, imported so that no environment variable can fail the
  import (what imports the SDK imports it through here, or through ``export/``).

Imports: ``record``, ``config``, OpenTelemetry. Nothing of devices (a ``stream_label`` function is given).
"""
