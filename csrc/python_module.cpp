// A Python module named _C: importing it loads this library, whose static initialisers register
// the sled ops with the dispatcher (torch.ops.sled.*). It also carries the constants the Python
// side must share with the kernels: the noise floor (sled_ext.reference) and the floats per row of
// sled.partials' stats.
#include <Python.h>

#include "sled_math.h"

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* m = PyModule_Create(&module);
  if (m == nullptr) return nullptr;
  PyObject* floor = PyFloat_FromDouble(sled::kNoiseFloor);
  if (floor == nullptr || PyModule_AddObject(m, "NOISE_FLOOR", floor) < 0) {  // steals on success
    Py_XDECREF(floor);
    Py_DECREF(m);
    return nullptr;
  }
  if (PyModule_AddIntConstant(m, "RECORD_FLOATS", sled::kRecordFloats) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
