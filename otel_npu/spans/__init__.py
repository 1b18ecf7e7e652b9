"""From a resolved record to a span (resolver thread): which records become spans, with which ids, and what
they carry.

* ``attributes.py``: every attribute name otel-npu writes (spans and metrics), the span limits, and the checks
  of what the user gave (attributes, links);
* ``identity.py``: trace and span ids, parents, and the sampler's decision;
* ``render.py``: ``SpanFactory``, the decisions one pipeline's sinks share, and the SDK rendering;
* ``sampling.py``: which steps are exported besides the sampler's (slow steps, steps with detail).

Imports: ``record``, ``config``, OpenTelemetry. Nothing of devices (a ``stream_label`` function is given).
"""
