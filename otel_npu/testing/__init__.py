"""A simulated asynchronous device, for otel-npu's tests and for testing your own instrumentation.

``SimDevice`` behaves like an accelerator seen from the host: work queued on a ``SimStream`` runs *later*, in
order, on a thread of its own, and timing events complete when the stream reaches them. Unlike real
hardware, every event's time is known exactly (``event.exec_mono_ns``, on the host's ``perf_counter_ns``
clock), so a test can check the spans otel-npu made against the truth::

    sim = SimDevice()
    otel_npu.configure(enabled=True, device=sim, tracer_provider=provider)
    with otel_npu.capture("forward"):
        sim.current_stream().launch(0.005)   # a 5 ms "kernel": returns at once
    otel_npu.flush()

The model: an op submitted at host time ``s`` starts at ``max(s + launch latency, end of the previous op)``;
a kernel (``launch(seconds)``) ends ``seconds`` later; an event record takes no time; ``call(fn)`` runs ``fn``
on the stream's thread and ends when it returns. Where the schedule is known at submit time (no ``call``
queued ahead), event times are fixed then; ``query()`` turns True once the host clock passes them, exactly as
a device's would. Each device's own clock runs at ``1 + drift_ppm/1e6`` of the host's, from an arbitrary epoch
(a different one per device index).

It is as strict as the real APIs where they can surprise a caller (from PyTorch's ``CUDAEvent.h`` and
``torch/cuda/graphs.py``, torch_npu's ``NPUEvent.cpp`` and ``NPUQueue.cpp``; see the README):

* ``query()`` is True for an event that was never recorded; ``elapsed_time`` raises for one;
* several devices (``device_count``): the current device and each device's current stream are per thread
  (``set_device``, ``device(i)``); an event belongs to the device of its first record, and recording it on
  a stream of another device raises (``Event device 0 does not match recording stream's device 1``);
* graph capture (``torch_cuda.graph``/``CUDAGraph``, ``torch_npu.npu.graph``/``NPUGraph``) with the real
  ``capture_error_mode`` rules: in ``"global"`` mode (the default) a device call from *another* thread
  during the capture (an event or stream query, a synchronize, a timing read: not a kernel launch, an
  event record on another stream, creating an event or a stream) raises and invalidates the capture, so that ``capture_end`` raises; in ``"thread_local"`` mode only
  the capturing thread's own such calls do. Work launched on the capturing stream goes into the graph and
  runs at ``replay()``; an event recorded on it is *not* a timing record (it keeps whatever it held before,
  and replays record nothing into it);
* NPU style (``api="npu"``): an optional host task queue (``task_queue_us``: records and kernels wait there,
  issued one every that many µs by a thread of its own; ``query()`` stays False until the record was
  issued), and timing reads (``elapsed_time``/``recorded_time``) that first drain every task queue and then
  hold the GIL for ``read_gil_hold_us`` (torch_npu's ``emptyAllNPUStream`` + synchronize). The event's ACL
  handle is ``event.npu_event``; ``sim.acl_event_get_timestamp(handle)`` reads a completed event's device
  time in whole µs without either (CANN's ``aclrtEventGetTimestamp``).

Two API faces: ``sim.torch_cuda`` (``torch.cuda``-like: ``elapsed_time`` in float32 ms, raising unless both
events completed) and ``sim.torch_npu`` (a stand-in for the ``torch_npu`` module: ``elapsed_time`` and
``recorded_time`` block until the event completes, like the real ones). Every timing read is logged in
``sim.timing_calls`` with the calling thread and whether the event had completed, so tests can prove that
otel-npu never reads an unfinished event nor reads anything on the capturing thread; every device call made
during a graph capture that broke it is in ``sim.capture_violations``; ``sim.events_created`` and
``sim.records_made`` count the events created per thread and the records issued per (thread, stream): two
per timed capture, by the capturing thread on the capture's stream.
"""


from .sim import CaptureViolation, SimDevice, SimEvent, SimGraph, SimStream, TimingCall, VirtualClock

__all__ = ["SimDevice", "SimStream", "SimEvent", "SimGraph", "TimingCall", "CaptureViolation", "VirtualClock"]
