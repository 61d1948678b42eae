// onnxruntime sessions through the C API, run without the GIL (see ort_capi.py).
//
// The library is the onnxruntime wheel's own libonnxruntime.so, opened by absolute path with
// dlopen (init): no second copy, and nothing for the dynamic linker to search for. The headers
// are Microsoft's, fetched at build time by ort_headers.py (never committed).
//
// Session(model, intra_op_threads, inter_op_threads, graph_optimization, memory_arena,
//         allow_spinning) builds a session from the model's bytes with the options the Python
//         side uses (runtime/serving/model.py SessionSettings.session_options).
// Session.run(feeds, output_names=None) checks every feed against the session's inputs (name,
//         element type, rank, fixed dimensions) with the GIL held, then releases the GIL around
//         OrtApi::Run; numeric outputs come back as numpy arrays over onnxruntime's own buffers
//         (no copy), string outputs as object arrays of str.
// Session.running: how many runs of this session are inside OrtApi::Run now (changed only while
//         the GIL is released, so Python can see it above zero only if the GIL is released).

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <dlfcn.h>

#include <atomic>
#include <cstring>
#include <string>
#include <vector>

#include "onnxruntime_c_api.h"
#include "ort_shared.h"

#ifndef EDGEWISE_ORT_DIGEST
#define EDGEWISE_ORT_DIGEST "unknown"
#endif

namespace {

const OrtApi* g_api = nullptr;
OrtEnv* g_env = nullptr;
OrtMemoryInfo* g_cpu = nullptr;
std::string g_version;

// Sets a Python exception from an OrtStatus (released) and returns true when there was one.
bool failed(OrtStatus* status, PyObject* type, const std::string& what) {
  if (status == nullptr) return false;
  std::string message = what + ": " + g_api->GetErrorMessage(status);
  g_api->ReleaseStatus(status);
  PyErr_SetString(type, message.c_str());
  return true;
}

const char* type_name(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return "float32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return "float64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return "float16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return "int8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return "int16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return "int32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return "int64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return "uint8";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return "uint16";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return "uint32";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return "uint64";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return "bool";
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING: return "string";
    default: return "unsupported";
  }
}

// The numpy type number of an onnxruntime element type, or -1.
int numpy_type(ONNXTensorElementDataType t) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: return NPY_FLOAT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: return NPY_FLOAT64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16: return NPY_FLOAT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: return NPY_INT8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: return NPY_INT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: return NPY_INT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: return NPY_INT64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: return NPY_UINT8;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: return NPY_UINT16;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: return NPY_UINT32;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: return NPY_UINT64;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: return NPY_BOOL;
    default: return -1;
  }
}

struct Port {  // one input or output of a session
  std::string name;
  bool is_tensor = false;
  ONNXType onnx_type = ONNX_TYPE_UNKNOWN;
  ONNXTensorElementDataType element = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> shape;  // -1: any size
};

const char* kind_name(ONNXType t) {
  switch (t) {
    case ONNX_TYPE_TENSOR: return "tensor";
    case ONNX_TYPE_SEQUENCE: return "sequence";
    case ONNX_TYPE_MAP: return "map";
    case ONNX_TYPE_OPTIONAL: return "optional";
    case ONNX_TYPE_SPARSETENSOR: return "sparse tensor";
    default: return "unknown";
  }
}

bool describe(OrtTypeInfo* info, Port* port) {
  OrtStatus* status = g_api->GetOnnxTypeFromTypeInfo(info, &port->onnx_type);
  if (failed(status, PyExc_RuntimeError, "cannot read the type of " + port->name)) return false;
  port->is_tensor = port->onnx_type == ONNX_TYPE_TENSOR;
  if (!port->is_tensor) return true;
  const OrtTensorTypeAndShapeInfo* tensor = nullptr;
  status = g_api->CastTypeInfoToTensorInfo(info, &tensor);
  if (failed(status, PyExc_RuntimeError, "cannot read the tensor type of " + port->name))
    return false;
  size_t rank = 0;
  if (failed(g_api->GetTensorElementType(tensor, &port->element), PyExc_RuntimeError,
             port->name) ||
      failed(g_api->GetDimensionsCount(tensor, &rank), PyExc_RuntimeError, port->name))
    return false;
  port->shape.assign(rank, -1);
  if (rank > 0 && failed(g_api->GetDimensions(tensor, port->shape.data(), rank),
                         PyExc_RuntimeError, port->name))
    return false;
  for (auto& d : port->shape)
    if (d < 0) d = -1;
  return true;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

// Drops one reference to a shared session; the last one releases it (any thread, no GIL).
void release_shared(EdgewiseOrtShared* shared) {
  if (shared->refs.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  shared->api->ReleaseSession(shared->session);
  delete shared;
}

struct SessionObject {
  PyObject_HEAD
  OrtSession* session;
  EdgewiseOrtShared* shared;  // this object's reference (the session is released through it)
  std::vector<Port>* inputs;
  std::vector<Port>* outputs;
  std::atomic<long>* running;
};

bool read_ports(OrtSession* session, bool outputs, std::vector<Port>* ports) {
  OrtAllocator* allocator = nullptr;
  if (failed(g_api->GetAllocatorWithDefaultOptions(&allocator), PyExc_RuntimeError,
             "no default allocator"))
    return false;
  size_t count = 0;
  OrtStatus* status = outputs ? g_api->SessionGetOutputCount(session, &count)
                              : g_api->SessionGetInputCount(session, &count);
  if (failed(status, PyExc_RuntimeError, "cannot count the session's ports")) return false;
  for (size_t i = 0; i < count; ++i) {
    Port port;
    char* name = nullptr;
    status = outputs ? g_api->SessionGetOutputName(session, i, allocator, &name)
                     : g_api->SessionGetInputName(session, i, allocator, &name);
    if (failed(status, PyExc_RuntimeError, "cannot read a port's name")) return false;
    port.name = name;
    allocator->Free(allocator, name);
    OrtTypeInfo* info = nullptr;
    status = outputs ? g_api->SessionGetOutputTypeInfo(session, i, &info)
                     : g_api->SessionGetInputTypeInfo(session, i, &info);
    if (failed(status, PyExc_RuntimeError, "cannot read the type of " + port.name)) return false;
    bool ok = describe(info, &port);
    g_api->ReleaseTypeInfo(info);
    if (!ok) return false;
    ports->push_back(std::move(port));
  }
  return true;
}

PyObject* ports_tuple(const std::vector<Port>& ports) {
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(ports.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < ports.size(); ++i) {
    const Port& p = ports[i];
    PyObject* shape = PyTuple_New(static_cast<Py_ssize_t>(p.shape.size()));
    if (shape == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    for (size_t d = 0; d < p.shape.size(); ++d)
      PyTuple_SET_ITEM(shape, d, PyLong_FromLongLong(p.shape[d]));
    const char* element = p.is_tensor ? type_name(p.element) : kind_name(p.onnx_type);
    PyObject* item = Py_BuildValue("(ssN)", p.name.c_str(), element, shape);
    if (item == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, i, item);
  }
  return out;
}

void session_dealloc(SessionObject* self) {
  if (self->shared != nullptr) {
    release_shared(self->shared);
  } else if (self->session != nullptr) {
    g_api->ReleaseSession(self->session);
  }
  delete self->inputs;
  delete self->outputs;
  delete self->running;
  Py_TYPE(self)->tp_free(reinterpret_cast<PyObject*>(self));
}

int session_init(SessionObject* self, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"model",          "intra_op_threads", "inter_op_threads",
                                   "graph_optimization", "memory_arena",  "allow_spinning",
                                   nullptr};
  Py_buffer model;
  int intra = 1, inter = 1, arena = 1, spinning = 0;
  const char* level_name = "all";
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*|iispp", const_cast<char**>(keywords), &model,
                                   &intra, &inter, &level_name, &arena, &spinning))
    return -1;
  if (g_api == nullptr) {
    PyBuffer_Release(&model);
    PyErr_SetString(PyExc_RuntimeError, "init(library_path) has not been called");
    return -1;
  }
  if (self->session != nullptr) {
    PyBuffer_Release(&model);
    PyErr_SetString(PyExc_RuntimeError, "the session is already initialised");
    return -1;
  }
  GraphOptimizationLevel level;
  std::string wanted = level_name;
  if (wanted == "disabled") level = ORT_DISABLE_ALL;
  else if (wanted == "basic") level = ORT_ENABLE_BASIC;
  else if (wanted == "extended") level = ORT_ENABLE_EXTENDED;
  else if (wanted == "all") level = ORT_ENABLE_ALL;
  else {
    PyBuffer_Release(&model);
    PyErr_Format(PyExc_ValueError,
                 "graph_optimization %s is not one of disabled, basic, extended, all",
                 level_name);
    return -1;
  }
  OrtSessionOptions* options = nullptr;
  OrtStatus* status = g_api->CreateSessionOptions(&options);
  if (status == nullptr) status = g_api->SetIntraOpNumThreads(options, intra);
  if (status == nullptr) status = g_api->SetInterOpNumThreads(options, inter);
  if (status == nullptr) status = g_api->SetSessionExecutionMode(options, ORT_SEQUENTIAL);
  if (status == nullptr) status = g_api->SetSessionGraphOptimizationLevel(options, level);
  if (status == nullptr)
    status = arena ? g_api->EnableCpuMemArena(options) : g_api->DisableCpuMemArena(options);
  if (status == nullptr)
    status = arena ? g_api->EnableMemPattern(options) : g_api->DisableMemPattern(options);
  const char* spin = spinning ? "1" : "0";
  if (status == nullptr)
    status = g_api->AddSessionConfigEntry(options, "session.intra_op.allow_spinning", spin);
  if (status == nullptr)
    status = g_api->AddSessionConfigEntry(options, "session.inter_op.allow_spinning", spin);
  if (status == nullptr) status = g_api->SetSessionLogSeverityLevel(options, 3);
  if (status == nullptr) {
    OrtSession* session = nullptr;
    Py_BEGIN_ALLOW_THREADS
    status = g_api->CreateSessionFromArray(g_env, model.buf, static_cast<size_t>(model.len),
                                           options, &session);
    Py_END_ALLOW_THREADS
    self->session = session;
  }
  if (options != nullptr) g_api->ReleaseSessionOptions(options);
  PyBuffer_Release(&model);
  if (failed(status, PyExc_RuntimeError, "onnxruntime cannot load the model")) return -1;
  self->shared = new EdgewiseOrtShared{{1}, g_api, self->session, g_cpu, release_shared};
  self->inputs = new std::vector<Port>();
  self->outputs = new std::vector<Port>();
  self->running = new std::atomic<long>(0);
  if (!read_ports(self->session, false, self->inputs) ||
      !read_ports(self->session, true, self->outputs))
    return -1;
  return 0;
}

// One feed, ready for onnxruntime: the array it reads (a reference held until the run ends).
struct Feed {
  PyArrayObject* array = nullptr;
  OrtValue* value = nullptr;
};

void release_feeds(std::vector<Feed>* feeds) {
  for (Feed& f : *feeds) {
    if (f.value != nullptr) g_api->ReleaseValue(f.value);
    Py_XDECREF(f.array);
  }
  feeds->clear();
}

std::string names_text(const std::vector<Port>& ports) {
  std::string out;
  for (const Port& p : ports) {
    if (!out.empty()) out += ", ";
    out += "'" + p.name + "'";
  }
  return out;
}

// The onnxruntime element type a numpy array holds, or UNDEFINED.
ONNXTensorElementDataType element_of(PyArrayObject* array) {
  PyArray_Descr* d = PyArray_DESCR(array);
  switch (d->type_num) {
    case NPY_OBJECT:
    case NPY_UNICODE:
    case NPY_STRING:
      return ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING;
    case NPY_BOOL: return ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    case NPY_HALF: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    default: break;
  }
  const int size = static_cast<int>(PyArray_ITEMSIZE(array));
  if (d->kind == 'f') {
    if (size == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    if (size == 8) return ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE;
  } else if (d->kind == 'i') {
    if (size == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
    if (size == 2) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16;
    if (size == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32;
    if (size == 8) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  } else if (d->kind == 'u') {
    if (size == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
    if (size == 2) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16;
    if (size == 4) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32;
    if (size == 8) return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64;
  }
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
}

// A string tensor's elements as UTF-8 (str) or raw (bytes); false with an exception set.
bool strings_of(const Port& port, PyArrayObject* array, std::vector<std::string>* out) {
  const npy_intp count = PyArray_SIZE(array);
  out->reserve(static_cast<size_t>(count));
  PyObject* flat = PyArray_Ravel(array, NPY_CORDER);
  if (flat == nullptr) return false;
  for (npy_intp i = 0; i < count; ++i) {
    PyObject* item = PySequence_GetItem(flat, i);
    if (item == nullptr) {
      Py_DECREF(flat);
      return false;
    }
    if (PyUnicode_Check(item)) {
      Py_ssize_t size = 0;
      const char* text = PyUnicode_AsUTF8AndSize(item, &size);
      if (text == nullptr) {
        Py_DECREF(item);
        Py_DECREF(flat);
        return false;
      }
      out->emplace_back(text, static_cast<size_t>(size));
    } else if (PyBytes_Check(item)) {
      out->emplace_back(PyBytes_AS_STRING(item), static_cast<size_t>(PyBytes_GET_SIZE(item)));
    } else {
      PyErr_Format(PyExc_ValueError, "input '%s': element %zd is a %s, not a string",
                   port.name.c_str(), static_cast<Py_ssize_t>(i), Py_TYPE(item)->tp_name);
      Py_DECREF(item);
      Py_DECREF(flat);
      return false;
    }
    Py_DECREF(item);
  }
  Py_DECREF(flat);
  return true;
}

// Checks ``object`` against ``port`` and makes its OrtValue; false with an exception set.
bool make_feed(const Port& port, PyObject* object, Feed* feed) {
  if (!PyArray_Check(object)) {
    PyErr_Format(PyExc_ValueError, "input '%s': a %s, not a numpy array", port.name.c_str(),
                 Py_TYPE(object)->tp_name);
    return false;
  }
  PyArrayObject* given = reinterpret_cast<PyArrayObject*>(object);
  ONNXTensorElementDataType element = element_of(given);
  if (element != port.element) {
    PyObject* dtype = PyObject_Str(reinterpret_cast<PyObject*>(PyArray_DESCR(given)));
    PyErr_Format(PyExc_ValueError, "input '%s': dtype %s does not match the model's %s",
                 port.name.c_str(), dtype != nullptr ? PyUnicode_AsUTF8(dtype) : "?",
                 type_name(port.element));
    Py_XDECREF(dtype);
    return false;
  }
  const int rank = PyArray_NDIM(given);
  std::vector<int64_t> shape(static_cast<size_t>(rank));
  for (int d = 0; d < rank; ++d) shape[d] = PyArray_DIM(given, d);
  bool fits = shape.size() == port.shape.size();
  for (size_t d = 0; fits && d < shape.size(); ++d)
    fits = port.shape[d] == -1 || port.shape[d] == shape[d];
  if (!fits) {
    PyErr_Format(PyExc_ValueError,
                 "input '%s': shape %s does not match the model's %s (-1 is any size)",
                 port.name.c_str(), shape_text(shape).c_str(), shape_text(port.shape).c_str());
    return false;
  }
  OrtStatus* status = nullptr;
  if (element == ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING) {
    std::vector<std::string> strings;
    if (!strings_of(port, given, &strings)) return false;
    OrtAllocator* allocator = nullptr;
    status = g_api->GetAllocatorWithDefaultOptions(&allocator);
    if (status == nullptr)
      status = g_api->CreateTensorAsOrtValue(allocator, shape.data(), shape.size(), element,
                                             &feed->value);
    if (status == nullptr && !strings.empty()) {
      std::vector<const char*> pointers;
      pointers.reserve(strings.size());
      for (const std::string& s : strings) pointers.push_back(s.c_str());
      status = g_api->FillStringTensor(feed->value, pointers.data(), pointers.size());
    }
    return !failed(status, PyExc_RuntimeError, "input '" + port.name + "'");
  }
  // Numeric: onnxruntime reads the array's own buffer (a C-contiguous, aligned, native copy
  // where the array is not one).
  feed->array = reinterpret_cast<PyArrayObject*>(PyArray_FromAny(
      object, nullptr, 0, 0, NPY_ARRAY_IN_ARRAY | NPY_ARRAY_NOTSWAPPED, nullptr));
  if (feed->array == nullptr) return false;
  const size_t bytes = static_cast<size_t>(PyArray_NBYTES(feed->array));
  status = g_api->CreateTensorWithDataAsOrtValue(g_cpu, PyArray_DATA(feed->array), bytes,
                                                 shape.data(), shape.size(), element,
                                                 &feed->value);
  return !failed(status, PyExc_RuntimeError, "input '" + port.name + "'");
}

void release_value(PyObject* capsule) {
  auto* value = static_cast<OrtValue*>(PyCapsule_GetPointer(capsule, "edgewise.OrtValue"));
  if (value != nullptr) g_api->ReleaseValue(value);
}

// The numpy array of one output; takes ownership of ``value`` (released on every path).
PyObject* to_numpy(const std::string& name, OrtValue* value) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  OrtStatus* status = g_api->GetTensorTypeAndShape(value, &info);
  if (failed(status, PyExc_RuntimeError, "output '" + name + "'")) {
    g_api->ReleaseValue(value);
    return nullptr;
  }
  ONNXTensorElementDataType element = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  size_t rank = 0;
  size_t count = 0;
  status = g_api->GetTensorElementType(info, &element);
  if (status == nullptr) status = g_api->GetDimensionsCount(info, &rank);
  std::vector<int64_t> shape(rank);
  if (status == nullptr && rank > 0) status = g_api->GetDimensions(info, shape.data(), rank);
  if (status == nullptr) status = g_api->GetTensorShapeElementCount(info, &count);
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  if (failed(status, PyExc_RuntimeError, "output '" + name + "'")) {
    g_api->ReleaseValue(value);
    return nullptr;
  }
  std::vector<npy_intp> dims(shape.begin(), shape.end());
  if (element == ONNX_TENSOR_ELEMENT_DATA_TYPE_STRING) {
    size_t length = 0;
    status = g_api->GetStringTensorDataLength(value, &length);
    std::string data(length, '\0');
    std::vector<size_t> offsets(count);
    if (status == nullptr && count > 0)
      status = g_api->GetStringTensorContent(value, data.data(), length, offsets.data(), count);
    g_api->ReleaseValue(value);
    if (failed(status, PyExc_RuntimeError, "output '" + name + "'")) return nullptr;
    PyObject* out = PyArray_SimpleNew(static_cast<int>(rank), dims.data(), NPY_OBJECT);
    if (out == nullptr) return nullptr;
    auto** items = static_cast<PyObject**>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(out)));
    for (size_t i = 0; i < count; ++i) {
      size_t end = i + 1 < count ? offsets[i + 1] : length;
      PyObject* text = PyUnicode_DecodeUTF8(data.data() + offsets[i],
                                            static_cast<Py_ssize_t>(end - offsets[i]), "replace");
      if (text == nullptr) {
        Py_DECREF(out);
        return nullptr;
      }
      Py_XSETREF(items[i], text);
    }
    return out;
  }
  const int typenum = numpy_type(element);
  if (typenum < 0) {
    g_api->ReleaseValue(value);
    PyErr_Format(PyExc_ValueError, "output '%s': element type %d has no numpy dtype here",
                 name.c_str(), static_cast<int>(element));
    return nullptr;
  }
  void* data = nullptr;
  status = g_api->GetTensorMutableData(value, &data);
  if (failed(status, PyExc_RuntimeError, "output '" + name + "'")) {
    g_api->ReleaseValue(value);
    return nullptr;
  }
  PyObject* capsule = PyCapsule_New(value, "edgewise.OrtValue", release_value);
  if (capsule == nullptr) {
    g_api->ReleaseValue(value);
    return nullptr;
  }
  PyObject* out = PyArray_SimpleNewFromData(static_cast<int>(rank), dims.data(), typenum, data);
  if (out == nullptr) {
    Py_DECREF(capsule);
    return nullptr;
  }
  if (PyArray_SetBaseObject(reinterpret_cast<PyArrayObject*>(out), capsule) != 0) {
    Py_DECREF(out);  // the capsule's reference was stolen even on failure
    return nullptr;
  }
  return out;
}

PyObject* session_run(SessionObject* self, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"feeds", "output_names", nullptr};
  PyObject* feeds_object = nullptr;
  PyObject* names_object = Py_None;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!|O", const_cast<char**>(keywords),
                                   &PyDict_Type, &feeds_object, &names_object))
    return nullptr;
  if (self->session == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the session is not initialised");
    return nullptr;
  }
  const std::vector<Port>& inputs = *self->inputs;
  const std::vector<Port>& outputs = *self->outputs;
  // Every feed must name an input.
  PyObject* key = nullptr;
  PyObject* item = nullptr;
  Py_ssize_t pos = 0;
  while (PyDict_Next(feeds_object, &pos, &key, &item)) {
    const char* name = PyUnicode_Check(key) ? PyUnicode_AsUTF8(key) : nullptr;
    if (name == nullptr) {
      PyErr_Clear();
      PyErr_SetString(PyExc_ValueError, "feeds: every key must be an input's name (a str)");
      return nullptr;
    }
    bool known = false;
    for (const Port& p : inputs) known = known || p.name == name;
    if (!known) {
      PyErr_Format(PyExc_ValueError, "input '%s' is not an input of the model (expected: %s)",
                   name, names_text(inputs).c_str());
      return nullptr;
    }
  }
  // The outputs asked for (all of them by default); tensors only.
  std::vector<size_t> wanted;
  if (names_object == Py_None) {
    for (size_t i = 0; i < outputs.size(); ++i) wanted.push_back(i);
  } else {
    PyObject* sequence = PySequence_Fast(names_object, "output_names must be a sequence of str");
    if (sequence == nullptr) return nullptr;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(sequence);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* entry = PySequence_Fast_GET_ITEM(sequence, i);
      const char* name = PyUnicode_Check(entry) ? PyUnicode_AsUTF8(entry) : nullptr;
      size_t found = outputs.size();
      for (size_t o = 0; name != nullptr && o < outputs.size(); ++o)
        if (outputs[o].name == name) found = o;
      if (found == outputs.size()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "output %R is not an output of the model (outputs: %s)",
                     entry, names_text(outputs).c_str());
        Py_DECREF(sequence);
        return nullptr;
      }
      wanted.push_back(found);
    }
    Py_DECREF(sequence);
  }
  for (size_t o : wanted) {
    if (!outputs[o].is_tensor) {
      PyErr_Format(PyExc_ValueError,
                   "output '%s' is a %s, not a tensor: the C API path returns tensors only",
                   outputs[o].name.c_str(), kind_name(outputs[o].onnx_type));
      return nullptr;
    }
  }
  // Every input fed, checked, and made into an OrtValue (with the GIL: it reads Python objects).
  std::vector<Feed> feeds(inputs.size());
  std::vector<const char*> input_names(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const Port& port = inputs[i];
    input_names[i] = port.name.c_str();
    PyObject* given = PyDict_GetItemString(feeds_object, port.name.c_str());
    if (given == nullptr) {
      PyErr_Format(PyExc_ValueError, "input '%s' is missing (the model needs: %s)",
                   port.name.c_str(), names_text(inputs).c_str());
      release_feeds(&feeds);
      return nullptr;
    }
    if (!port.is_tensor) {
      PyErr_Format(PyExc_ValueError, "input '%s' is a %s: the C API path feeds tensors only",
                   port.name.c_str(), kind_name(port.onnx_type));
      release_feeds(&feeds);
      return nullptr;
    }
    if (!make_feed(port, given, &feeds[i])) {
      release_feeds(&feeds);
      return nullptr;
    }
  }
  std::vector<const OrtValue*> values(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) values[i] = feeds[i].value;
  std::vector<const char*> output_names(wanted.size());
  for (size_t i = 0; i < wanted.size(); ++i) output_names[i] = outputs[wanted[i]].name.c_str();
  std::vector<OrtValue*> results(wanted.size(), nullptr);
  OrtStatus* status = nullptr;
  std::atomic<long>* running = self->running;
  Py_BEGIN_ALLOW_THREADS
  running->fetch_add(1);
  status = g_api->Run(self->session, nullptr, input_names.data(), values.data(), values.size(),
                      output_names.data(), output_names.size(), results.data());
  running->fetch_sub(1);
  Py_END_ALLOW_THREADS
  release_feeds(&feeds);
  if (status != nullptr) {
    for (OrtValue* v : results)
      if (v != nullptr) g_api->ReleaseValue(v);
    // As the Python side translates onnxruntime's errors (model.py _edgewise_error): the
    // request's fault is a ValueError, anything else a RuntimeError.
    const OrtErrorCode code = g_api->GetErrorCode(status);
    const bool bad_request = code == ORT_INVALID_ARGUMENT || code == ORT_NOT_IMPLEMENTED;
    failed(status, bad_request ? PyExc_ValueError : PyExc_RuntimeError,
           "onnxruntime refused the run");
    return nullptr;
  }
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(results.size()));
  for (size_t i = 0; i < results.size(); ++i) {
    PyObject* array = out != nullptr ? to_numpy(output_names[i], results[i]) : nullptr;
    if (array == nullptr) {
      if (out == nullptr && results[i] != nullptr) g_api->ReleaseValue(results[i]);
      for (size_t j = i + 1; j < results.size(); ++j) g_api->ReleaseValue(results[j]);
      Py_XDECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i, array);
  }
  return out;
}

PyObject* session_inputs(SessionObject* self, void*) {
  if (self->inputs == nullptr) return PyTuple_New(0);
  return ports_tuple(*self->inputs);
}

PyObject* session_outputs(SessionObject* self, void*) {
  if (self->outputs == nullptr) return PyTuple_New(0);
  return ports_tuple(*self->outputs);
}

PyObject* session_running(SessionObject* self, void*) {
  return PyLong_FromLong(self->running != nullptr ? self->running->load() : 0);
}

// The session for the native front end: a capsule holding a borrowed EdgewiseOrtShared
// pointer (ort_shared.h), valid while this object lives; the taker adds its own reference.
PyObject* session_shared(SessionObject* self, void*) {
  if (self->shared == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the session is not initialised");
    return nullptr;
  }
  return PyCapsule_New(self->shared, EDGEWISE_ORT_SHARED_CAPSULE, nullptr);
}

PyMethodDef session_methods[] = {
    {"run", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(session_run)),
     METH_VARARGS | METH_KEYWORDS,
     "run(feeds, output_names=None) -> list of numpy arrays, without the GIL"},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef session_getset[] = {
    {"inputs", reinterpret_cast<getter>(session_inputs), nullptr,
     "((name, element type, shape), ...)", nullptr},
    {"outputs", reinterpret_cast<getter>(session_outputs), nullptr,
     "((name, element type or kind, shape), ...)", nullptr},
    {"running", reinterpret_cast<getter>(session_running), nullptr,
     "runs of this session inside onnxruntime now", nullptr},
    {"shared", reinterpret_cast<getter>(session_shared), nullptr,
     "a capsule of the reference-counted session, for the native front end", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyTypeObject SessionType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyObject* module_init(PyObject*, PyObject* args) {
  const char* path = nullptr;
  if (!PyArg_ParseTuple(args, "s", &path)) return nullptr;
  if (g_api != nullptr) return PyUnicode_FromString(g_version.c_str());
  void* library = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    PyErr_Format(PyExc_OSError, "cannot open %s: %s", path, dlerror());
    return nullptr;
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto get_base = reinterpret_cast<GetApiBase>(dlsym(library, "OrtGetApiBase"));
  if (get_base == nullptr) {
    PyErr_Format(PyExc_OSError, "%s has no OrtGetApiBase", path);
    return nullptr;
  }
  const OrtApiBase* base = get_base();
  const OrtApi* api = base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    PyErr_Format(PyExc_OSError, "%s (onnxruntime %s) does not serve C API version %d", path,
                 base->GetVersionString(), ORT_API_VERSION);
    return nullptr;
  }
  g_api = api;
  OrtStatus* status = api->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "edgewise", &g_env);
  if (status == nullptr)
    status = api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &g_cpu);
  if (failed(status, PyExc_RuntimeError, "onnxruntime's environment")) {
    g_api = nullptr;
    return nullptr;
  }
  g_version = base->GetVersionString();
  return PyUnicode_FromString(g_version.c_str());
}

PyMethodDef module_methods[] = {
    {"init", module_init, METH_VARARGS,
     "init(library_path) -> onnxruntime's version: open the library (once per process)"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_ort",
                          "onnxruntime sessions through the C API, run without the GIL", -1,
                          module_methods};

}  // namespace

PyMODINIT_FUNC PyInit__ort(void) {
  import_array();
  SessionType.tp_name = "edgewise.runtime.frontends.native._ort.Session";
  SessionType.tp_basicsize = sizeof(SessionObject);
  SessionType.tp_flags = Py_TPFLAGS_DEFAULT;
  SessionType.tp_doc = "An onnxruntime session made through the C API";
  SessionType.tp_new = PyType_GenericNew;
  SessionType.tp_init = reinterpret_cast<initproc>(session_init);
  SessionType.tp_dealloc = reinterpret_cast<destructor>(session_dealloc);
  SessionType.tp_methods = session_methods;
  SessionType.tp_getset = session_getset;
  if (PyType_Ready(&SessionType) < 0) return nullptr;
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  Py_INCREF(&SessionType);
  if (PyModule_AddObject(module, "Session", reinterpret_cast<PyObject*>(&SessionType)) < 0 ||
      PyModule_AddStringConstant(module, "SOURCE_DIGEST", EDGEWISE_ORT_DIGEST) < 0 ||
      PyModule_AddIntConstant(module, "API_VERSION", ORT_API_VERSION) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
