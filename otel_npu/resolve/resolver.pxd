# Cython declarations of resolver.py for its compiled twin (setup.py; docs/architecture.md, "The compiled data
# path"). Python ignores this file. Resolver is an extension type here: its attributes are C fields, so the
# per-capture code reads them without a dictionary lookup. Every one is public (readable and settable from
# Python, as in the .py), and __dict__ keeps any attribute not declared here working (only slower): declare
# an attribute added to Resolver.__init__ here too.

cdef class Resolver:
    cdef dict __dict__
    cdef public object _pending, _backend, _query, _pool, _clock, _primary, _pools, _clocks, _wanted
    cdef public object _make_device, _preparing, _device, _host, _mono, _stats, _emit, _on_step, _interval
    cdef public object _last_intake_ns, _timeout_ns, _queues, _steps, _markers, _intake_seq, _wake, _cond
    cdef public object _waiters, _stopping, _last_host_refresh, _graph_ns, _max_pending, _on_room, _room
    cdef public object _in_flight, _abandoned, _on_idle, _worked, thread, alive
