# Cython declarations of otlp.py for its compiled twin (see resolve/resolver.pxd for the conventions).

cdef class OtlpSink:
    cdef dict __dict__
    cdef public object _transport, _encoder, _stats, _batch, _closed, _cond, _delay, _enqueued, _flush_to
    cdef public object _max_queue, _queue, _send, _settled, _stopping, _thread, endpoint
