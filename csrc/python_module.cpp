// The Python module tts_kernels._C. Importing it runs the static TORCH_LIBRARY
// registrations of the linked sources; it exposes one query function.
#include <Python.h>

static PyObject* has_cuda_kernels(PyObject*, PyObject*) {
#ifdef TTS_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"has_cuda_kernels", has_cuda_kernels, METH_NOARGS, "True when the CUDA kernels were compiled in."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};

extern "C" PyObject* PyInit__C(void) { return PyModule_Create(&module_def); }
