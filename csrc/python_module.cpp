// An empty Python module named _C: importing it loads this library, whose static initialisers
// register the sled ops with the dispatcher (torch.ops.sled.*).
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
