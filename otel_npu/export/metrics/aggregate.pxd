# Cython declarations of aggregate.py for its compiled twin (see resolve/resolver.pxd for the conventions).

cdef class StageAggregator:
    cdef dict __dict__
    cdef public object _const, _series, _width, start_ns, _exemplars, round_exemplars
