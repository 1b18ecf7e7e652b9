"""The extension tables and the configuration agree: every name a variable accepts has a builder, and every
builder a name the variable accepts (config validates some names itself, the tables build them)."""

from __future__ import annotations

from otel_npu import config
from otel_npu.devices import registry as devices
from otel_npu.export import registry as exporters


def test_every_device_kind_is_accepted_and_auto_tries_them_in_the_tables_order():
    assert config.DEVICES == ("auto", *devices.KINDS)
    assert list(devices.KINDS)[-1] == "cpu"  # auto's last resort never fails
    for kind in devices.KINDS.values():
        assert callable(kind.make) and callable(kind.graph_classes) and callable(kind.stream_capturing)


def test_samplers_and_protocols_named_by_config_are_built_by_the_export_tables():
    assert set(exporters.SAMPLERS) == set(config.otel.SAMPLERS)
    assert set(exporters.TRANSPORTS) == set(config.otel.PROTOCOLS)


def test_the_exporter_tables_name_the_same_exporters():
    assert set(exporters.SPAN_EXPORTERS) == set(exporters.SDK_SPAN_EXPORTERS)
    assert "none" not in exporters.SPAN_EXPORTERS and exporters.names(exporters.SPAN_EXPORTERS)[-1] == "none"


def test_transports_have_the_transport_shape():
    from otel_npu.export import transports

    for cls in (transports.GrpcTransport, transports.HttpTransport, transports.JsonLinesFileTransport,
                transports.ProtoFileTransport):
        assert callable(getattr(cls, "send", None)) and callable(getattr(cls, "shutdown", None)), cls


def test_a_file_transport_is_a_transport_and_the_sinks_are_sinks(tmp_path):
    from otel_npu.export.sinks.otlp import OtlpSink
    from otel_npu.export.sinks.sdk import SdkSink
    from otel_npu.export.transports import JsonLinesFileTransport

    transport = JsonLinesFileTransport(str(tmp_path / "t.jsonl"))
    try:
        assert isinstance(transport, exporters.Transport)
        assert transport.send("{}\n", 1) == (True, None)
    finally:
        transport.shutdown()
    for sink in (OtlpSink, SdkSink):
        assert all(callable(getattr(sink, name, None)) for name in ("emit", "force_flush", "shutdown"))


def test_an_exporter_named_in_the_table_gets_every_exported_record_and_is_flushed_and_shut_down(monkeypatch):
    """The exporter seam as docs/extending.md describes it: a Sink and one SPAN_EXPORTERS entry, selected by
    OTEL_TRACES_EXPORTER, with nothing else edited."""
    import otel_npu

    calls = []

    class FooSink:
        def __init__(self, ctx: exporters.SinkContext) -> None:
            self.factory = ctx.factory

        def emit(self, r) -> None:
            calls.append(("emit", r.name, self.factory.attributes(r)["otel_npu.device"]))

        def force_flush(self, timeout_s: float) -> bool:
            calls.append(("flush",))
            return True

        def shutdown(self, timeout_s: float) -> None:
            calls.append(("shutdown",))

    monkeypatch.setitem(exporters.SPAN_EXPORTERS, "foo", lambda ctx: (FooSink(ctx), "foo"))
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "foo")
    otel_npu.configure(enabled=True, device="cpu", pipeline="own")
    with otel_npu.step("Decode"), otel_npu.capture("forward"):
        pass
    assert otel_npu.flush(10.0)
    assert "foo" in otel_npu.stats()["pipeline"]
    otel_npu.shutdown(5.0)
    emitted = [c for c in calls if c[0] == "emit"]
    assert sorted(emitted) == [("emit", "Decode", "cpu"), ("emit", "forward", "cpu")]
    assert ("flush",) in calls and calls[-1] == ("shutdown",)
