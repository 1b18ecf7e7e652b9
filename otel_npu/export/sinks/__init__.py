"""Sinks: where identified, sampled spans go. Each has the ``registry.Sink`` shape: ``emit(record)`` on the
resolver thread, ``force_flush(timeout_s) -> bool`` and ``shutdown(timeout_s)`` from any thread.

* ``sdk.py``: ``SdkSink`` hands finished ``ReadableSpan`` objects to an SDK span processor (``on_end``): the
  application's TracerProvider, or otel-npu's own console exporter;
* ``otlp.py``: ``OtlpSink``, otel-npu's own export: spans encoded on the resolver thread (``encoding/``, no
  SDK objects), held in a bounded queue, sent in batches by one exporter thread through a transport
  (``transports.py``);
* ``file.py``: ``JsonLinesSpanExporter``, the traces file for an application's own TracerProvider.

Nothing here runs on the capturing thread.
"""
