"""Resolved records encoded for the wire by hand, from the span factory's decisions (resolver thread):

* ``otlp_proto.py``: OTLP protobuf (``SpanEncoder``), for the OTLP HTTP/gRPC transports;
* ``otlp_json.py``: OTLP/JSON (``JsonSpanEncoder``), for the traces file; and ``request_to_json_line``, the same
  JSON from a protobuf ``ExportTraceServiceRequest``.
"""
