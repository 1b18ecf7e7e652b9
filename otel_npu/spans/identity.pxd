# Cython declarations of identity.py for its compiled twin (see resolve/resolver.pxd for the conventions).

cdef class Identity:
    cdef dict __dict__
    cdef public object _sampler, _ids, _new_span_id, start_attributes, sampler_links
