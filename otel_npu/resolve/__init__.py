"""From device events to timed records, on one background thread.

* ``resolver.py``: the thread. Takes captures in from the hot path's queue, waits (without blocking) for
  their events, places them in time, completes steps, and hands each record to the span pipeline;
* ``clock.py``: device time -> host monotonic time -> wall clock, with a stated error bound.

Imports: ``record``, ``accounting``, ``devices``. Nothing of spans or export: the resolver is given an
``emit`` callback.
"""
