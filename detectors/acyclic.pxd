# The C API that detectors/acyclic.py calls when compiled (setup.py); its source build never does.
cdef extern from "Python.h":
    void PyObject_GC_UnTrack(object)
