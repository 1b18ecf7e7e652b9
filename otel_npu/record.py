"""The record of one capture or step: what the hot path writes, and what the resolver, the span factory and
the exporters read and complete. One object per timed use of ``capture()``/``step()``; nothing is copied
between the stages of the data path.

Who writes each field, and when (a field is written by one thread at a time; the hand-over between threads
is the ``deque.append`` into the runtime's ``pending`` queue, after which the capturing thread writes
nothing more except where said):

==================  ==========================  =============================================================
field               written by                  when, and what it holds
==================  ==========================  =============================================================
``name``            capturing thread            at creation: the span name
``attributes``      capturing thread            at creation: the mapping given (read later: not copied);
                    resolver thread             replaced by its cleaned, limited copy when the span is made
``stream``          capturing thread            at creation (``stream=``) or entry: the device stream
                                                (CPU backend: the entering ``Thread``)
``auto_stream``     capturing thread            at entry, when entry chose the stream (each use its own)
``parent``          capturing thread            at entry: the enclosing record, or ``None``
``otel_ctx``        capturing thread            at entry, only when ``parent`` is ``None``: the OTel
                                                context current then (the span's parent, the sampler's input)
``start``           capturing thread            at creation ``None``; at entry ``DROPPED`` (claimed, not
                                                timed) and then the start event (CPU: host ns) once timed
``end``             capturing thread            at entry: the end event (recorded at exit); CPU: host ns
                                                at exit
``host_start``      capturing thread            host monotonic ns just before the start record
``host_end``        capturing thread            host monotonic ns just before the end record
``error``           capturing thread            at exit: ``None``, or (type name, message, stack) of the
                                                exception leaving the block
``_token``          capturing thread            at entry: the context-variable token (a marker once exited
                                                elsewhere: not a parent for later captures)
``origin``          capturing thread            only on a record made for a re-entry: the object entered again
``detail``          capturing thread            a capture: ``True`` for ``detail=True``; a step: its detail
                                                budget, 0 (none), 1 (allowed), 2 (allowed and taken)
``compat``          capturing / resolver /      ``ProfileExecuteDuration``: ``"pending"`` at creation,
                    popping thread              ``"logged"`` once its duration line was written
``intake``          resolver thread             when taken in: its sequence number (flush markers)
``graph_ns``        resolver thread             when taken in: graph-capture time so far (time-out clock)
``step``            resolver thread             when taken in: the nearest timed enclosing step, or ``None``
``done``            resolver thread             ``False`` when taken in, ``True`` once emitted
``timed_out``       resolver thread             when resolved: its events did not complete in time
``start_ns``        resolver thread             when resolved: wall-clock start (epoch ns); a step's is
``end_ns``                                      widened to cover its captures
``clock_error_ns``  resolver thread             when resolved: bound on the error of ``start_ns``/``end_ns``
``sampled``         capturing thread (``None``)  then the span factory (resolver thread): the sampler's
                                                decision, inherited by nested records
``trace_id``        resolver thread             when identified (``spans``): the span's ids, its parent's
``span_id``                                     span id (0 for a root), whether that parent is remote, and
``parent_span_id``                              the sampler's trace state
``parent_remote``
``trace_state``
``links``           capturing thread (steps)    at creation: the batch's request contexts (a tuple);
                    resolver thread             replaced by the cleaned ``LinkList`` when first rendered
``kept``            resolver thread (steps)     why a step the sampler dropped is exported anyway
                                                (``("slow", threshold ms)`` / ``("detail", None)``), else
                                                ``None``
==================  ==========================  =============================================================

``is_step`` is a class attribute (True on step records). Records of steps carry the two extra slots
``STEP_SLOTS``.
"""

from __future__ import annotations

from typing import Any

#: ``Record.start`` of a record that was entered but could not be timed (pool empty, record failed, pending
#: limit, graph capture). Its children parent to its nearest timed ancestor.
DROPPED: Any = object()


class Record:
    """One capture or step, from entry to export. The fields and their writers: see the module docstring."""

    __slots__ = (
        # capturing thread
        "name", "attributes", "stream", "parent", "otel_ctx", "host_start", "host_end", "start", "end",
        "error", "_token", "origin", "auto_stream", "detail", "compat",
        # resolver thread
        "step", "trace_id", "span_id", "parent_span_id", "sampled", "trace_state", "start_ns", "end_ns",
        "clock_error_ns", "timed_out", "done", "intake", "parent_remote", "graph_ns",
    )
    is_step = False
    #: A step's request links; a capture has none.
    links: Any = ()

    # The type of every slot (the module docstring says who writes each, and when).
    # capturing thread
    name: str
    attributes: Any  # a mapping (the caller's, then a cleaned copy)
    stream: Any  # a device stream; CPU: a Thread
    parent: "Record | None"
    otel_ctx: Any  # an OpenTelemetry Context
    host_start: int
    host_end: int
    start: Any  # None, DROPPED, a device event, or host ns (CPU)
    end: Any  # a device event, or host ns (CPU)
    error: Any  # None, or (type name, message, stack)
    _token: Any
    origin: Any
    auto_stream: Any  # the stream entry chose, when it chose one
    detail: bool | int
    compat: str | None
    # resolver thread
    step: "Record | None"
    trace_id: int
    span_id: int
    parent_span_id: int
    sampled: bool | None
    trace_state: Any  # an OpenTelemetry TraceState, or None
    start_ns: int
    end_ns: int
    clock_error_ns: int
    timed_out: bool
    done: bool
    intake: int
    parent_remote: bool
    graph_ns: int
    # steps only (``STEP_SLOTS``)
    kept: tuple[str, float | None] | None


#: The slots a step record adds (see the table above).
STEP_SLOTS = ("links", "kept")
