"""Where resolved spans and stage metrics go: the last stage of the data path (resolver thread and the
exporters' own threads; never the capturing thread).

* ``pipeline.py``: decides, once per process, between the application's providers and otel-npu's own
  pipeline built from the ``OTEL_*`` settings (``config.otel``), and which records are exported;
* ``registry.py``: the ``Sink`` and ``Transport`` protocols and the tables of exporters, transports and
  samplers by name (where a new exporter goes);
* ``sinks/``: the SDK span-processor sink, otel-npu's batching OTLP sink, the traces-file SDK exporter;
* ``transports.py``: OTLP gRPC / HTTP and file transports;
* ``encoding/``: OTLP protobuf and OTLP/JSON encoding of resolved records (templated, no SDK objects);
* ``metrics/``: the stage-duration histogram and capture counters;
* ``redact.py``: header secrets kept out of every log line and error text.
"""

# Before any module here imports the OpenTelemetry SDK's trace package (most do, at module level): imported
# by spans/sdk.py, so that no environment variable can make that import fail.
from ..spans import sdk as _sdk  # noqa: F401
