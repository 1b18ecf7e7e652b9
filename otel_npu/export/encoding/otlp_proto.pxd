# Cython declarations of otlp_proto.py for its compiled twin (see resolve/resolver.pxd for the conventions).

cdef class SpanEncoder:
    cdef dict __dict__
    cdef public object _f, _const, _names, _streams, _steps, _templates, _lead, _error, _timed_out, _step_kind
    cdef public object _resource, _scope, _link_fields, _attr_fields
