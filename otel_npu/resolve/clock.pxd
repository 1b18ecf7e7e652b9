# Cython declarations of clock.py for its compiled twin (see resolve/resolver.pxd for the conventions): the
# clocks are extension types whose attributes are public C fields; __dict__ keeps undeclared ones working.

cdef class HostClock:
    cdef dict __dict__
    cdef public object mono, _wall, offset_ns, error_ns


cdef class DeviceClock:
    cdef dict __dict__
    cdef public object _backend, _take, _give, _mono, _keep_ns, anchors, rate, rate_error, _pending, _last_try_ns
