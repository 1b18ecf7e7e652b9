"""Integrations with serving engines. Each imports its engine only when the engine loads it (entry points),
never when ``otel_npu`` is imported, and uses otel-npu's public API only."""
