"""Integrations with serving engines, at the side of the package.

Each engine module (``vllm.py``) is loaded by its engine (an entry point), never when ``otel_npu`` is
imported, and imports only otel-npu's public API and the engine-agnostic integration core: ``_patch.py`` (the
version-gated hook table, checked before anything is patched) and ``_engine_step.py`` (the step open between
engine calls, the requests' trace contexts, where spans go). A new engine is one more
module on that core: see ``docs/extending.md``.
"""
