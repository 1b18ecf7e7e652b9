"""Where resolved spans and stage metrics go: the last stage of the data path.

* ``pipeline.py`` — decides, once per process, between the application's providers and otel-npu's own
  pipeline built from the standard ``OTEL_*`` variables;
* ``otlp.py`` — OTLP protobuf encoding of resolved captures (templated, no SDK objects);
* ``sinks.py`` — the sinks: an SDK span processor, or otel-npu's batching OTLP HTTP/gRPC/file transports;
* ``metrics.py`` — the stage-duration histogram and capture counters;
* ``redact.py`` — header secrets kept out of every log line and error text.
"""
