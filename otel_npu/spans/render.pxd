# Cython declarations of render.py for its compiled twin (see resolve/resolver.pxd for the conventions).

cdef class SpanFactory:
    cdef dict __dict__
    cdef public object sampler, _stream_label, _labels, to_wall, host_offset, const_attributes, _timeout_text
    cdef public object _own_keys, limits, cleaner, user_attributes, links, identity, identify, rekey
