"""A span's identity: trace id, span id, parent, and the sampler's decision (resolver thread).

The sampler is asked once per *root* of a capture tree (an outermost capture or step), with the OTel context
that was current at its entry as parent context; nested captures inherit the decision, as every standard
sampler would decide for a child of a local sampled parent. A capture under an unsampled parent gets no ids
(its span is not made); ``rekey`` gives them later if its step is exported after all.

**Where ids come from.** The id generator of the pipeline's TracerProvider, with one exception: the SDK's
``RandomIdGenerator`` (the default) draws from Python's global ``random``, which applications seed —
vLLM calls ``random.seed(seed)`` in every worker (``seed=0`` by default), so every rank and every server
would emit the same trace and span ids, and the same again after each restart. So where the provider's
generator is exactly the SDK's ``RandomIdGenerator`` (and in otel-npu's own pipeline), ids are drawn from an
RNG of otel-npu's own instead (``IdGenerator``: the same distribution, uniform non-zero 128-bit trace and
64-bit span ids), seeded from ``os.urandom`` at import and re-seeded in a forked child, so that neither the
application's seeding nor a fork can make ids repeat. Any other id generator (a custom one, the AWS X-Ray
one, ...) is honoured as it is.
"""

from __future__ import annotations

import collections.abc
import functools
import os
import random
from typing import Any, Callable, Sequence

from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind

from ..record import DROPPED, Record
from .sdk import trace as sdk_trace  # the SDK's trace package, imported so that no variable can fail it

RandomIdGenerator = sdk_trace.RandomIdGenerator


#: otel-npu's own source of ids (see the module docstring): seeded from the OS, never from the application.
_rng = random.Random(os.urandom(32))


def _reseed_in_child() -> None:
    # A forked child has a copy of the parent's state: without this, both would draw the same ids.
    _rng.seed(os.urandom(32))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reseed_in_child)


class IdGenerator(sdk_trace.IdGenerator):
    """The SDK's ``RandomIdGenerator`` (uniform non-zero ids) drawing from otel-npu's own RNG, which
    ``random.seed()`` does not touch and a forked child re-seeds.

    For a ``TracerProvider`` of your own in a program that seeds ``random`` (as vLLM does in every worker):
    ``TracerProvider(id_generator=otel_npu.IdGenerator())``. The vLLM plugin gives it to vLLM's tracer."""

    def generate_span_id(self) -> int:
        span_id = _rng.getrandbits(64)
        while span_id == 0:
            span_id = _rng.getrandbits(64)
        return span_id

    def generate_trace_id(self) -> int:
        trace_id = _rng.getrandbits(128)
        while trace_id == 0:
            trace_id = _rng.getrandbits(128)
        return trace_id


class _LazyAttributes(collections.abc.Mapping):
    """The attributes shown to the sampler, built only if the sampler reads them: the SDK's ratio and
    parent-based samplers never do, and building them costs ≈ 2 µs per step on the sampled-out path."""

    __slots__ = ("_make", "_r", "_data")

    def __init__(self, make: Callable[[Any], dict], r: Record) -> None:
        self._make = make
        self._r = r
        self._data: dict | None = None

    def _get(self) -> dict:
        data = self._data
        if data is None:
            data = self._data = self._make(self._r)
        return data

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Any:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return repr(self._get())


def _root_context(r: Record) -> Any:
    """The OTel context current when the outermost capture of ``r``'s chain (dropped ones included) began."""
    while r.parent is not None:
        r = r.parent
    return r.otel_ctx


class Identity:
    """Ids and sampling decisions for the records of one pipeline. ``id_generator``: the provider's; the SDK's
    ``RandomIdGenerator`` is replaced by ``IdGenerator`` (see the module docstring), any other is used."""

    def __init__(self, *, sampler: Any, id_generator: Any, start_attributes: Callable[[Record], dict],
                 sampler_links: Callable[[Record], Sequence[Link]]) -> None:
        self._sampler = sampler
        own = type(id_generator) in (RandomIdGenerator, IdGenerator)
        self._ids = IdGenerator() if own else id_generator
        self._new_span_id = self._ids.generate_span_id
        if own:
            # The same draw without the Python method around it (that loops only to avoid 0, which
            # getrandbits(64) returns once in 2**64 draws).
            self._new_span_id = functools.partial(_rng.getrandbits, 64)
        self.start_attributes = start_attributes
        self.sampler_links = sampler_links

    def identify(self, r: Record) -> bool:
        """Decide whether ``r`` is sampled; give a sampled ``r`` (and, lazily, its ancestors) trace/span ids.

        A capture under an unsampled parent gets no ids (its span is not made: the cheap path for the
        sampled-out majority); ``rekey`` gives them later if its step is exported after all. A root is
        always given ids (the sampler needs its trace id)."""
        sampled = r.sampled
        if sampled is not None:
            return sampled
        parent = r.parent
        while parent is not None and parent.start is DROPPED:
            parent = parent.parent
        if parent is not None:
            sampled = parent.sampled
            if sampled is None:
                sampled = self.identify(parent)
            if not sampled:
                r.sampled = False
                return False
            r.trace_id = parent.trace_id
            r.parent_span_id = parent.span_id
            r.trace_state = parent.trace_state
            r.parent_remote = False
        else:
            ctx = _root_context(r)
            parent_ctx = trace.get_current_span(ctx).get_span_context()
            r.parent_remote = parent_ctx.is_remote
            if parent_ctx.is_valid:
                r.trace_id = parent_ctx.trace_id
                r.parent_span_id = parent_ctx.span_id
            else:
                r.trace_id = self._ids.generate_trace_id()
                r.parent_span_id = 0
            # As the SDK's Tracer.start_span asks: the span's attributes (those known at its start) and its
            # links as Link objects.
            result = self._sampler.should_sample(ctx, r.trace_id, r.name, SpanKind.INTERNAL,
                                                 _LazyAttributes(self.start_attributes, r), self.sampler_links(r))
            sampled = result.decision.is_sampled()
            r.trace_state = result.trace_state
        r.span_id = self._new_span_id()
        r.sampled = sampled
        return sampled

    def rekey(self, records: Sequence[Record]) -> None:
        """``records`` (captures of a step the sampler dropped) are exported after all: their step was set
        sampled; give them ids under it."""
        for r in records:
            r.sampled = None
        for r in records:
            self.identify(r)

