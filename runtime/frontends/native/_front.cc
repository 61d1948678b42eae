// The native front end: gRPC's C++ server on the public port (see binding.py).
//
// Every call on the port comes through gRPC's generic asynchronous service (public grpcpp/
// headers only) and its events through one completion queue, polled by one thread of the
// front end's own, which never takes the GIL. A ModelInfer call's request is read there, the call
// counted in flight and queued for the front end's worker threads, which hand the bytes to one
// Python callable (the GIL taken only for that call); its answer goes back without any Python
// gRPC machinery, at once or later (Front.complete, for a call waiting in a batch queue).
// Every other call (health, reflection, metadata, the repository and monitoring services) is
// relayed byte for byte, metadata, deadline, status and trailers included, to the process's
// grpc.aio server on a private Unix socket, so that those services are served by the same
// Python code as without this front end; a client that cancels (or whose deadline passes)
// cancels the relayed call.
//
// The public port serves plaintext, TLS or mutual TLS (PortCredentials): gRPC's TLS credentials
// with its file watcher, so that certificates rotate without a restart, as on grpcio. The
// private socket stays plaintext.
//
// Built by `python -m edgewise.runtime.frontends.native.build` against the system's gRPC C++
// library (Debian: libgrpc++-dev). Python 3.11 C API only; no pybind11.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <structmember.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <iterator>
#include <thread>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <unordered_map>
#include <vector>

#ifdef EDGEWISE_FAST
#include "onnxruntime_c_api.h"
#include "ort_shared.h"
#endif

#ifndef EDGEWISE_FRONT_DIGEST
#define EDGEWISE_FRONT_DIGEST "unknown"
#endif

namespace {

// The Python handler's answer code besides gRPC's: the answer comes later, through
// Front.complete(token, answer) (the call waits in a batch queue on the event loop).
constexpr int kPending = -2;

// An answer from Python: (code, message, body or None, ((key, value), ...), work deferred).
struct Parsed {
  int code = static_cast<int>(grpc::StatusCode::INTERNAL);
  std::string message = "internal error in the front end";
  grpc::Slice reply;
  bool has_reply = false;
  std::vector<std::pair<std::string, std::string>> trailers;
  bool run_after = false;
};

// Reads an answer tuple (the GIL held); a malformed one leaves the INTERNAL defaults.
Parsed ParseAnswer(PyObject* result) {
  Parsed out;
  if (!result || !PyTuple_Check(result) || PyTuple_GET_SIZE(result) != 5) return out;
  PyObject* py_code = PyTuple_GET_ITEM(result, 0);
  PyObject* py_message = PyTuple_GET_ITEM(result, 1);
  PyObject* py_body = PyTuple_GET_ITEM(result, 2);
  PyObject* py_trailers = PyTuple_GET_ITEM(result, 3);
  if (!PyLong_Check(py_code) || !PyUnicode_Check(py_message) ||
      !(py_body == Py_None || PyBytes_Check(py_body)) || !PyTuple_Check(py_trailers)) {
    return out;
  }
  out.code = static_cast<int>(PyLong_AsLong(py_code));
  Py_ssize_t size = 0;
  const char* text = PyUnicode_AsUTF8AndSize(py_message, &size);
  if (text) out.message.assign(text, static_cast<size_t>(size));
  if (py_body != Py_None) {
    out.reply = grpc::Slice(PyBytes_AS_STRING(py_body), static_cast<size_t>(PyBytes_GET_SIZE(py_body)));
    out.has_reply = true;
  }
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(py_trailers); ++i) {
    PyObject* pair = PyTuple_GET_ITEM(py_trailers, i);
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) continue;
    const char* key = PyUnicode_AsUTF8(PyTuple_GET_ITEM(pair, 0));
    const char* value = PyUnicode_AsUTF8(PyTuple_GET_ITEM(pair, 1));
    if (key && value) out.trailers.emplace_back(key, value);
  }
  out.run_after = PyObject_IsTrue(PyTuple_GET_ITEM(result, 4)) == 1;
  if (PyErr_Occurred()) PyErr_Print();
  return out;
}

// This thread's Python thread state, made on its first call into Python and kept for the
// thread's life: PyGILState_Ensure/Release would create and destroy one at every call, which
// costs more than the rest of the hand-over.
PyThreadState*& ThreadState() {
  thread_local PyThreadState* state = nullptr;
  return state;
}

// The GIL, for the front end's own threads.
class Gil {
 public:
  Gil() {
    PyThreadState*& state = ThreadState();
    if (state == nullptr) {
      PyGILState_Ensure();  // never released: the thread state stays
      state = PyThreadState_Get();
    } else {
      PyEval_RestoreThread(state);
    }
  }
  ~Gil() { PyEval_SaveThread(); }
  Gil(const Gil&) = delete;
  Gil& operator=(const Gil&) = delete;
};

// At a thread's end (the interpreter alive, the GIL not held): its thread state goes.
void ForgetThreadState() {
  PyThreadState*& state = ThreadState();
  if (state == nullptr) return;
  PyEval_RestoreThread(state);
  PyThreadState_Clear(state);
  PyThreadState_DeleteCurrent();
  state = nullptr;
}

// The message's bytes as a Python bytes object (the GIL held), copied once.
PyObject* ToBytes(const std::vector<grpc::Slice>& slices) {
  size_t size = 0;
  for (const auto& slice : slices) size += slice.size();
  PyObject* out = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size));
  if (!out) return nullptr;
  char* into = PyBytes_AS_STRING(out);
  for (const auto& slice : slices) {
    std::memcpy(into, slice.begin(), slice.size());
    into += slice.size();
  }
  return out;
}

// A metadata value as a Python str (the GIL held), or None where the call did not send it.
PyObject* OptionalText(bool present, const grpc::string_ref& value) {
  if (!present) return Py_NewRef(Py_None);
  return PyUnicode_DecodeLatin1(value.data(), static_cast<Py_ssize_t>(value.size()), nullptr);
}

// The metadata that carries a client certificate's identities to grpcio on the private socket
// (security.py PEER_HEADER): set here only, never copied from a client.
constexpr const char* kPeerHeader = "edgewise-peer-identity";
// Marks a call one server process forwards to another; grpcio believes it only on its private
// Unix socket, and a client's own is dropped here so that it cannot arrive there through us.
constexpr const char* kForwardedHeader = "edgewise-forwarded";

bool Forwardable(const std::string& key) {
  // What gRPC itself sets on each hop is not copied: pseudo-headers, the transport's own
  // headers and grpc-* (the deadline travels as the relayed call's deadline).
  if (key.empty() || key[0] == ':') return false;
  if (key.rfind("grpc-", 0) == 0) return false;
  if (key == kPeerHeader || key == kForwardedHeader) return false;
  return key != "content-type" && key != "te" && key != "user-agent";
}

// A client certificate's identities, as security.py's auth_context_identities reads them:
// "CN=" its subject common name, then "SAN=" each subject alternative name (printable ASCII
// only: what metadata can carry). Empty without a client certificate.
std::vector<std::string> PeerIdentities(const grpc::ServerContextBase& context) {
  std::vector<std::string> identities;
  std::shared_ptr<const grpc::AuthContext> auth = context.auth_context();
  if (!auth) return identities;
  auto printable = [](const grpc::string_ref& value) {
    if (value.size() == 0) return false;
    for (char c : value) {
      if (c < 0x20 || c > 0x7e) return false;
    }
    return true;
  };
  for (const auto& value : auth->FindPropertyValues("x509_common_name")) {
    if (printable(value)) identities.push_back("CN=" + std::string(value.data(), value.size()));
    break;
  }
  for (const auto& value : auth->FindPropertyValues("x509_subject_alternative_name")) {
    if (printable(value)) identities.push_back("SAN=" + std::string(value.data(), value.size()));
  }
  return identities;
}

// ---- the fast path (issue 26): decode, onnxruntime, encode without the GIL ---------------------
//
// Python (fast_path.py) decides which model versions may be served here and hands each one over
// as a FastModel: its inputs and outputs as validated at load, the onnxruntime session made from
// the same bytes (reference counted: ort_shared.h), whether its monitor takes the requests' rows.
// A ModelInfer call is served here, on the poller that read it, when everything about it is the
// common case: a model version in the table, the inputs exactly the model's (FP32, FP64, INT32 or
// INT64; raw or typed), no parameters, outputs the model has, its deadline not passed, the calls
// in flight within the limit Python set. Anything else (and any failure) goes to the Python path
// unchanged, which gives the same answer or error as before; each such call is counted by reason.
#ifdef EDGEWISE_FAST

// Fallback reasons, in the order Python names them (fast_path.py REASONS).
enum FallbackReason {
  kNotInTable = 0,  // the model or version is not served here (ineligible, unknown, a label)
  kRequestForm,     // the request is not the common case (or not well formed: Python says why)
  kInputs,          // its inputs do not match the model exactly (Python gives the error)
  kLimit,           // the calls in flight are at the limit: Python decides (sheds)
  kDeadline,        // its deadline passed: Python answers DEADLINE_EXCEEDED
  kRun,             // onnxruntime refused the run or an output is not a plain tensor
  kKeyed,           // the call has a request id and the model keeps predictions for labels
  kLarge,           // its body is over small_max_bytes: a worker thread runs it, as before
  kReasons
};

constexpr int kBuckets = 14;  // metrics.py LATENCY_BUCKETS and +Inf
constexpr double kBucketBounds[kBuckets - 1] = {0.0001, 0.00025, 0.0005, 0.00075, 0.001,
                                                0.0025, 0.005,   0.01,    0.025,   0.05,
                                                0.1,    0.25,    1.0};

struct FastInput {
  std::string name, datatype;
  ONNXTensorElementDataType element;
  size_t item;                  // bytes per element
  std::vector<int64_t> shape;   // the model's, -1 any size
};

// One request's rows for the monitor: each input's bytes (the model's dtype) and the watched
// output's bytes, and the rows they hold.
struct RingRecord {
  std::vector<std::string> inputs;
  std::string output;
  std::vector<int64_t> output_shape;
  int64_t rows = 0;
};

// One sampled call for the data capture (capture.py): the id it is captured under (the
// request's, else the caller's x-request-id, else "": the Python path's rule), when it was
// answered, its inputs in the request's order (the model's dtype; the model's input index and
// the shape of each) and its answered outputs' raw bytes (names only when the call named them).
struct CaptureRecord {
  std::string request_id;
  int64_t time_ns = 0;
  int64_t rows = 0;
  std::vector<int> input_index;
  std::vector<std::string> inputs;
  std::vector<std::vector<int64_t>> input_shapes;
  bool named = false;  // the call named its outputs (else: every output, in the model's order)
  std::vector<std::string> output_names;
  std::vector<const char*> output_types;
  std::vector<std::string> outputs;
  size_t bytes = 0;
};

// CRC-32 (zlib's polynomial, as Python's zlib.crc32).
uint32_t Crc32(const std::string& text) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  for (unsigned char byte : text) crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

// capture.py's sampled(): a hash of the id (CRC-32 times a Fibonacci multiplier, modulo 2**32)
// against the rate, so that a call is sampled alike on both paths; at random without an id.
bool CaptureSampled(const std::string& id, double rate) {
  if (rate >= 1.0) return true;
  if (rate <= 0.0) return false;
  if (!id.empty()) {
    uint32_t mixed = Crc32(id) * 0x9E3779B1u;
    return static_cast<double>(mixed) < rate * 4294967296.0;
  }
  thread_local std::mt19937_64 random{std::random_device{}()};
  return static_cast<double>(random() >> 11) * 0x1.0p-53 < rate;
}

struct FastModel {
  std::string name, version;
  std::vector<FastInput> inputs;
  std::vector<std::string> outputs;  // every output, in the model's order
  std::string watched;               // the monitor's prediction output ("" none)
  bool monitored = false;
  bool keeps_keyed = false;  // online quality: a call with a request id is Python's
  EdgewiseOrtShared* session = nullptr;
  size_t ring_max_rows = 0;

  std::atomic<uint64_t> ok{0};
  std::atomic<uint64_t> buckets[kBuckets] = {};
  std::atomic<uint64_t> nanos{0};
  std::atomic<uint64_t> fallbacks[kReasons] = {};
  std::atomic<uint64_t> dropped_rows{0};

  std::mutex ring_mu;
  std::deque<RingRecord> ring;
  size_t ring_rows = 0;

  // The data capture (0: off): the sampled calls wait here for Python's drain, bounded.
  double capture_rate = 0.0;
  size_t capture_max_records = 0, capture_max_bytes = 0;
  std::atomic<uint64_t> capture_dropped{0};
  std::mutex capture_mu;
  std::deque<CaptureRecord> captured;
  size_t captured_bytes = 0;

  ~FastModel() {
    if (session != nullptr) session->release(session);
  }
  void Observe(double seconds) {
    int b = 0;
    while (b < kBuckets - 1 && seconds > kBucketBounds[b]) ++b;
    buckets[b].fetch_add(1, std::memory_order_relaxed);
    ok.fetch_add(1, std::memory_order_relaxed);
    nanos.fetch_add(static_cast<uint64_t>(seconds * 1e9), std::memory_order_relaxed);
  }
  // Never blocks on the drainer for long (it swaps the queue out under the lock); a record that
  // would take the ring past its bound is dropped and its rows counted.
  void Offer(RingRecord&& record) {
    std::lock_guard<std::mutex> lock(ring_mu);
    if (ring_rows + static_cast<size_t>(record.rows) > ring_max_rows) {
      dropped_rows.fetch_add(static_cast<uint64_t>(record.rows), std::memory_order_relaxed);
      return;
    }
    ring_rows += static_cast<size_t>(record.rows);
    ring.push_back(std::move(record));
  }
  // Likewise for a captured call: over the bound it is dropped and counted (queue_full).
  void Capture(CaptureRecord&& record) {
    std::lock_guard<std::mutex> lock(capture_mu);
    if (captured.size() >= capture_max_records || captured_bytes + record.bytes > capture_max_bytes) {
      capture_dropped.fetch_add(1, std::memory_order_relaxed);
      return;
    }
    captured_bytes += record.bytes;
    captured.push_back(std::move(record));
  }
};

using FastTable = std::unordered_map<std::string, std::shared_ptr<FastModel>>;

std::string FastKey(const std::string& name, const std::string& version) {
  return name + '\n' + version;
}

// ---- protobuf wire format (ModelInferRequest in, ModelInferResponse out) ----

struct Reader {
  const uint8_t* p;
  const uint8_t* end;
  bool Varint(uint64_t* out) {
    uint64_t value = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) return false;
      uint8_t byte = *p++;
      value |= static_cast<uint64_t>(byte & 0x7f) << shift;
      if (!(byte & 0x80)) {
        *out = value;
        return true;
      }
    }
    return false;
  }
  bool Bytes(const uint8_t** data, size_t* size) {
    uint64_t n;
    if (!Varint(&n) || n > static_cast<uint64_t>(end - p)) return false;
    *data = p;
    *size = static_cast<size_t>(n);
    p += n;
    return true;
  }
  bool Skip(int wire) {
    uint64_t v;
    const uint8_t* d;
    size_t n;
    switch (wire) {
      case 0: return Varint(&v);
      case 1: if (end - p < 8) return false; p += 8; return true;
      case 2: return Bytes(&d, &n);
      case 5: if (end - p < 4) return false; p += 4; return true;
      default: return false;
    }
  }
};

struct View {
  const uint8_t* data = nullptr;
  size_t size = 0;
  std::string str() const { return std::string(reinterpret_cast<const char*>(data), size); }
  bool eq(const std::string& s) const { return size == s.size() && std::memcmp(data, s.data(), size) == 0; }
};

struct InputTensor {
  View name, datatype;
  std::vector<int64_t> shape;
  int typed_field = 0;  // the one contents field that carries values (0: none)
  View typed;           // its bytes (packed)
  int typed_fields = 0; // how many contents fields were given
};

struct Request {
  View model_name, model_version, id;
  std::vector<InputTensor> inputs;
  std::vector<View> outputs;
  std::vector<View> raw;
};

// The tensor's shape (packed or not).
bool ParseShape(Reader& r, int wire, std::vector<int64_t>* shape) {
  uint64_t v;
  if (wire == 0) {
    if (!r.Varint(&v)) return false;
    shape->push_back(static_cast<int64_t>(v));
    return true;
  }
  if (wire != 2) return false;
  View packed;
  if (!r.Bytes(&packed.data, &packed.size)) return false;
  Reader inner{packed.data, packed.data + packed.size};
  while (inner.p < inner.end) {
    if (!inner.Varint(&v)) return false;
    shape->push_back(static_cast<int64_t>(v));
  }
  return true;
}

// false: not the common case (parameters, unpacked typed contents, anything odd).
bool ParseInput(View bytes, InputTensor* t) {
  Reader r{bytes.data, bytes.data + bytes.size};
  while (r.p < r.end) {
    uint64_t key;
    if (!r.Varint(&key)) return false;
    int field = static_cast<int>(key >> 3), wire = static_cast<int>(key & 7);
    if (field == 1 && wire == 2) {
      if (!r.Bytes(&t->name.data, &t->name.size)) return false;
    } else if (field == 2 && wire == 2) {
      if (!r.Bytes(&t->datatype.data, &t->datatype.size)) return false;
    } else if (field == 3) {
      if (!ParseShape(r, wire, &t->shape)) return false;
    } else if (field == 5 && wire == 2) {
      View contents;
      if (!r.Bytes(&contents.data, &contents.size)) return false;
      Reader c{contents.data, contents.data + contents.size};
      while (c.p < c.end) {
        uint64_t ckey;
        if (!c.Varint(&ckey)) return false;
        int cfield = static_cast<int>(ckey >> 3);
        if ((ckey & 7) != 2) return false;  // unpacked repeated values: Python's
        View packed;
        if (!c.Bytes(&packed.data, &packed.size)) return false;
        if (t->typed_field != 0 && t->typed_field != cfield) return false;
        if (t->typed_field == cfield) return false;  // split across records: Python's
        t->typed_field = cfield;
        t->typed = packed;
        ++t->typed_fields;
      }
    } else {
      return false;  // parameters, or an unknown field
    }
  }
  return true;
}

bool ParseRequest(const uint8_t* data, size_t size, Request* req) {
  Reader r{data, data + size};
  while (r.p < r.end) {
    uint64_t key;
    if (!r.Varint(&key)) return false;
    int field = static_cast<int>(key >> 3), wire = static_cast<int>(key & 7);
    if (wire != 2) return false;
    View v;
    if (!r.Bytes(&v.data, &v.size)) return false;
    switch (field) {
      case 1: req->model_name = v; break;
      case 2: req->model_version = v; break;
      case 3: req->id = v; break;
      case 5: {
        req->inputs.emplace_back();
        if (!ParseInput(v, &req->inputs.back())) return false;
        break;
      }
      case 6: {  // a requested output: its name only (parameters: Python's)
        Reader o{v.data, v.data + v.size};
        View name;
        while (o.p < o.end) {
          uint64_t okey;
          if (!o.Varint(&okey)) return false;
          if (okey != ((1 << 3) | 2)) return false;
          if (!o.Bytes(&name.data, &name.size)) return false;
        }
        req->outputs.push_back(name);
        break;
      }
      case 7: req->raw.push_back(v); break;
      default: return false;  // parameters, or an unknown field
    }
  }
  return true;
}

struct Writer {
  std::string out;
  void Varint(uint64_t v) {
    while (v >= 0x80) {
      out.push_back(static_cast<char>((v & 0x7f) | 0x80));
      v >>= 7;
    }
    out.push_back(static_cast<char>(v));
  }
  void Key(int field, int wire) { Varint((static_cast<uint64_t>(field) << 3) | wire); }
  void Bytes(int field, const void* data, size_t size) {
    Key(field, 2);
    Varint(size);
    out.append(static_cast<const char*>(data), size);
  }
  void Text(int field, const std::string& s) {
    if (!s.empty()) Bytes(field, s.data(), s.size());
  }
};

size_t VarintSize(uint64_t v) {
  size_t n = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++n;
  }
  return n;
}

// One output of a run: its V2 datatype, the typed contents field that carries it, and how each
// element is written there.
struct OutputKind {
  const char* datatype;
  int field;    // InferTensorContents field
  int wire;     // 0 varint, 5 fixed32, 1 fixed64
  size_t item;  // bytes per element in the tensor
  bool is_signed, is_bool;
};

bool KindOf(ONNXTensorElementDataType t, OutputKind* k) {
  switch (t) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT: *k = {"FP32", 6, 5, 4, false, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE: *k = {"FP64", 7, 1, 8, false, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8: *k = {"INT8", 2, 0, 1, true, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT16: *k = {"INT16", 2, 0, 2, true, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32: *k = {"INT32", 2, 0, 4, true, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64: *k = {"INT64", 3, 0, 8, true, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8: *k = {"UINT8", 4, 0, 1, false, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT16: *k = {"UINT16", 4, 0, 2, false, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT32: *k = {"UINT32", 4, 0, 4, false, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT64: *k = {"UINT64", 5, 0, 8, false, false}; return true;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL: *k = {"BOOL", 1, 0, 1, false, true}; return true;
    default: return false;
  }
}

uint64_t ElementVarint(const uint8_t* p, const OutputKind& k) {
  if (k.is_bool) return *p ? 1 : 0;
  switch (k.item) {
    case 1: return k.is_signed ? static_cast<uint64_t>(static_cast<int64_t>(*reinterpret_cast<const int8_t*>(p))) : *p;
    case 2: {
      if (k.is_signed) { int16_t v; std::memcpy(&v, p, 2); return static_cast<uint64_t>(static_cast<int64_t>(v)); }
      uint16_t v; std::memcpy(&v, p, 2); return v;
    }
    case 4: {
      if (k.is_signed) { int32_t v; std::memcpy(&v, p, 4); return static_cast<uint64_t>(static_cast<int64_t>(v)); }
      uint32_t v; std::memcpy(&v, p, 4); return v;
    }
    default: { uint64_t v; std::memcpy(&v, p, 8); return v; }
  }
}

// An output tensor of the response (InferOutputTensor), raw bytes appended to `raw` instead of
// typed contents when the request came raw (as codecs.py encode_outputs).
void WriteOutput(Writer& w, const std::string& name, const OutputKind& k,
                 const std::vector<int64_t>& shape, const uint8_t* data, size_t count, bool raw,
                 std::vector<std::pair<const uint8_t*, size_t>>* raws) {
  Writer t;
  t.Text(1, name);
  t.Text(2, k.datatype);
  if (!shape.empty()) {
    size_t n = 0;
    for (int64_t d : shape) n += VarintSize(static_cast<uint64_t>(d));
    t.Key(3, 2);
    t.Varint(n);
    for (int64_t d : shape) t.Varint(static_cast<uint64_t>(d));
  }
  if (raw) {
    raws->emplace_back(data, count * k.item);
  } else {
    Writer c;
    if (count > 0) {
      if (k.wire == 0) {
        size_t n = 0;
        for (size_t i = 0; i < count; ++i) n += VarintSize(ElementVarint(data + i * k.item, k));
        c.Key(k.field, 2);
        c.Varint(n);
        for (size_t i = 0; i < count; ++i) c.Varint(ElementVarint(data + i * k.item, k));
      } else {
        c.Bytes(k.field, data, count * k.item);
      }
    }
    t.Bytes(5, c.out.data(), c.out.size());
  }
  w.Bytes(5, t.out.data(), t.out.size());
}

// request_context.py trace_id_of: the trace id of a well-formed W3C traceparent, else "".
std::string TraceIdOf(const std::string& tp) {
  auto hex = [&](size_t from, size_t n) {
    if (from + n > tp.size()) return false;
    for (size_t i = from; i < from + n; ++i) {
      char c = tp[i];
      if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
    }
    return true;
  };
  if (tp.size() < 55 || !hex(0, 2) || tp[2] != '-' || !hex(3, 32) || tp[35] != '-' ||
      !hex(36, 16) || tp[52] != '-' || !hex(53, 2))
    return "";
  if (tp.size() > 55 && tp[55] != '-') return "";
  std::string version = tp.substr(0, 2);
  if (version == "ff" || (version == "00" && tp.size() != 55)) return "";
  std::string trace = tp.substr(3, 32), parent = tp.substr(36, 16);
  if (trace == std::string(32, '0') || parent == std::string(16, '0')) return "";
  return trace;
}

bool Echoable(const std::string& s) {
  if (s.empty() || s.size() > 256) return false;
  for (char c : s)
    if (c < 0x20 || c > 0x7e) return false;
  return true;
}

std::string NewRequestId() {
  thread_local std::mt19937_64 random{std::random_device{}()};
  char text[17];
  std::snprintf(text, sizeof text, "%016llx", static_cast<unsigned long long>(random()));
  return text;
}

// Decodes one input into the model's dtype (a copy, aligned); false: not the common case.
bool DecodeInput(const FastInput& spec, const InputTensor& t, const View* raw, int64_t count,
                 std::string* out) {
  const size_t bytes = static_cast<size_t>(count) * spec.item;
  if (raw != nullptr) {
    if (raw->size != bytes) return false;
    out->assign(reinterpret_cast<const char*>(raw->data), raw->size);
    return true;
  }
  if (t.typed_fields != 1 && count > 0) return false;
  if (count == 0) {
    if (t.typed_fields != 0) return false;
    out->clear();
    return true;
  }
  const int want = spec.element == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT    ? 6
                   : spec.element == ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE ? 7
                   : spec.element == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32  ? 2
                                                                           : 3;
  if (t.typed_field != want) return false;
  if (want == 6 || want == 7) {
    if (t.typed.size != bytes) return false;
    out->assign(reinterpret_cast<const char*>(t.typed.data), t.typed.size);
    return true;
  }
  out->resize(bytes);
  Reader r{t.typed.data, t.typed.data + t.typed.size};
  for (int64_t i = 0; i < count; ++i) {
    uint64_t v;
    if (!r.Varint(&v)) return false;
    if (want == 2) {
      int64_t wide = static_cast<int64_t>(v);
      if (wide < INT32_MIN || wide > INT32_MAX) return false;
      int32_t narrow = static_cast<int32_t>(wide);
      std::memcpy(&(*out)[static_cast<size_t>(i) * 4], &narrow, 4);
    } else {
      std::memcpy(&(*out)[static_cast<size_t>(i) * 8], &v, 8);
    }
  }
  return r.p == r.end;
}

#endif  // EDGEWISE_FAST

struct Front;

// One event of the completion queue: each tag handed to gRPC is the address of one of these.
class Event {
 public:
  virtual void Proceed(bool ok) = 0;

 protected:
  ~Event() = default;
};

// An event that calls owner->*method(ok).
template <class Owner>
class Step final : public Event {
 public:
  Step(Owner* owner, void (Owner::*method)(bool)) : owner_(owner), method_(method) {}
  void Proceed(bool ok) override { (owner_->*method_)(ok); }

 private:
  Owner* owner_;
  void (Owner::*method_)(bool);
};

// A call as gRPC's generic async service gives it: its context and its stream, which stay at one
// address for the call's life (the stream points at the context). The context's done event
// (finished or cancelled) comes to whichever object serves the call, once it has one.
class Stream {
 public:
  Stream() { context.AsyncNotifyWhenDone(&done_); }
  // target->Proceed(true) once the call is over: now, if it already is.
  void WhenDone(Event* target) { done_.Target(target); }

  grpc::GenericServerContext context;
  grpc::GenericServerAsyncReaderWriter stream{&context};

 private:
  class Done final : public Event {
   public:
    void Proceed(bool) override {
      Event* target;
      {
        std::lock_guard<std::mutex> lock(mu_);
        fired_ = true;
        target = target_;
      }
      if (target) target->Proceed(true);
    }
    void Target(Event* target) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        target_ = target;
        if (!fired_) return;
      }
      target->Proceed(true);
    }

   private:
    std::mutex mu_;
    bool fired_ = false;
    Event* target_ = nullptr;
  };
  Done done_;  // fires only for a call the server gave (never for one asked for at shutdown)
};

// One ModelInfer call: its request is read, then one of the front end's own threads answers it
// through the Python handler (Answer), or Front.complete does later (Complete).
class InferCall {
 public:
  InferCall(Front* front, std::unique_ptr<Stream> call);

  // The fast path: on one of the front end's own threads.
  void Answer();
  // A pending call's answer, from Front.complete (the GIL held). Returns false when the call
  // was not pending (a second completion): nothing is done then.
  bool Complete(PyObject* answer);

 private:
  void ReadDone(bool ok);
  void FinishDone(bool ok);
  void CallDone(bool ok);
  void Unref();  // one of the finish and the call's end has come: the second deletes the call
  // Writes the answer or the status; unlocks `lock` first (the finish may complete, and this
  // object be deleted on a poller thread, before it returns).
  void Deliver(Parsed& answer, std::unique_lock<std::mutex>& lock);
  void Uncount();  // the call no longer counts as in flight
#ifdef EDGEWISE_FAST
  bool TryFast();  // answered on the fast path (see FastModel)
#endif

  Front* front_;
  std::unique_ptr<Stream> call_;
  grpc::ByteBuffer request_;
  Step<InferCall> read_{this, &InferCall::ReadDone};
  Step<InferCall> finish_{this, &InferCall::FinishDone};
  Step<InferCall> done_{this, &InferCall::CallDone};
  std::atomic<int> refs_{2};  // the finish and the call's end
  std::atomic<bool> counted_{false};
  std::mutex mu_;
  bool pending_ = false;
  bool answered_ = false;
  // An answer that came through Front.complete before Answer() saw the handler's kPending (the
  // event loop can run the batch before this thread gets the lock back).
  std::optional<Parsed> early_;
};

// Any other call on the public port: relayed to the Python server. The public side's operations
// complete on the front end's completion queue, the relayed call's on gRPC's callback threads;
// one lock orders them, and the object goes when nothing of either side is outstanding.
class Call {
 public:
  Call(Front* front, std::unique_ptr<Stream> call);

  // The relayed call to the Python server.
  class Upstream final : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
   public:
    explicit Upstream(Call* call) : call_(call) {}
    void OnReadDone(bool ok) override { call_->UpstreamReadDone(ok); }
    void OnWriteDone(bool ok) override { call_->UpstreamWriteDone(ok); }
    void OnWritesDoneDone(bool) override {}
    void OnDone(const grpc::Status& status) override { call_->UpstreamDone(status); }

   private:
    Call* call_;
  };

 private:
  // Every entry point holds the lock through one of these: the last one out deletes the call
  // once nothing is outstanding (callbacks may run inline, inside another entry point).
  class Entry {
   public:
    explicit Entry(Call* call) : call_(call), lock_(call->mu_) { ++call_->depth_; }
    ~Entry() {
      bool last = --call_->depth_ == 0 && call_->Over();
      lock_.unlock();
      if (last) call_->Release();
    }
    Entry(const Entry&) = delete;
    Entry& operator=(const Entry&) = delete;

   private:
    Call* call_;
    std::unique_lock<std::recursive_mutex> lock_;
  };

  void StartRelay();                    // relay the call to the Python server
  void ClientReadDone(bool ok);         // the public side's events
  void ClientWriteDone(bool ok);
  void FinishDone(bool ok);
  void CallDone(bool ok);
  void UpstreamReadDone(bool ok);       // the relayed call's
  void UpstreamWriteDone(bool ok);
  void UpstreamDone(const grpc::Status& status);
  void ReadFromClient();     // mu_ held
  void ReleaseWriteHold();   // mu_ held
  void ReleaseReadHold();    // mu_ held
  void FinishLocked(const grpc::Status& status);  // mu_ held
  bool Over() const {        // mu_ held: nothing outstanding on either side
    return upstream_done_ && finish_done_ && call_done_ && !reading_ && !writing_to_client_;
  }
  void Release();

  Front* front_;
  std::unique_ptr<Stream> call_;
  Step<Call> read_{this, &Call::ClientReadDone};
  Step<Call> write_{this, &Call::ClientWriteDone};
  Step<Call> finish_{this, &Call::FinishDone};
  Step<Call> done_{this, &Call::CallDone};
  std::recursive_mutex mu_;
  int depth_ = 0;
  bool released_ = false;
  grpc::ByteBuffer from_client_, from_upstream_;
  std::unique_ptr<grpc::ClientContext> upstream_context_;
  Upstream upstream_{this};
  bool write_hold_ = false, read_hold_ = false;
  bool reading_ = false;            // a read from the client is outstanding
  bool client_closed_ = false;      // the client has half-closed (or is gone)
  bool writing_to_client_ = false;  // a write to the client is outstanding
  bool finished_ = false;           // Finish was started
  bool finish_done_ = false;        // ... and has completed
  bool call_done_ = false;          // the call is over (finished, or cancelled by the client)
  bool finish_pending_ = false;
  grpc::Status pending_status_;
  bool upstream_done_ = true;
};

// A call the server is asked for: when one comes, it becomes an InferCall or a relayed Call,
// and another is asked for.
class Accept final : public Event {
 public:
  explicit Accept(Front* front);
  void Proceed(bool ok) override;

 private:
  Front* front_;
  std::unique_ptr<Stream> call_;
};

struct Front {
  PyObject* handler = nullptr;  // handle(body, authorization, remaining, in_flight, token, peer,
                                //        request_id, traceparent)
  PyObject* after = nullptr;    // after(): work deferred until the answer is on its way
  std::string fast_method;
  std::unique_ptr<grpc::GenericStub> upstream;
  // Every call on the public port comes through gRPC's generic async service: the front end's
  // own pollers take its events from the completion queue (no callback executor in between).
  grpc::AsyncGenericService service;  // outlives the server
  std::unique_ptr<grpc::ServerCompletionQueue> queue;
  std::unique_ptr<grpc::Server> server;
  std::vector<std::thread> pollers;
  std::atomic<long> in_flight{0};
  std::atomic<long> calls{0};
  std::atomic<long> relayed{0};
#ifdef EDGEWISE_FAST
  // The fast path's model versions by FastKey (replaced whole by set_fast: atomic_load/store),
  // the in-flight limit it keeps to (0: none), its calls, and the calls it sent on to Python
  // with no model version of the table to count them on.
  std::shared_ptr<const FastTable> fast_table;
  std::atomic<long> fast_limit{0};
  std::atomic<long> other_in_flight{0};  // the HTTP front end's calls, as the shedder counts them
  // Set by a fast call, cleared by wait_fast: wakes Python's publisher (fast_path.py) once per
  // batch of calls, never per call.
  std::atomic<bool> fast_dirty{false};
  std::mutex fast_mu;
  std::condition_variable fast_cv;
  void FastAnswered() {
    fast_calls.fetch_add(1, std::memory_order_relaxed);
    if (!fast_dirty.exchange(true, std::memory_order_acq_rel)) {
      std::lock_guard<std::mutex> lock(fast_mu);
      fast_cv.notify_one();
    }
  }
  std::atomic<size_t> fast_max_bytes{0};  // larger requests go to Python (memory admission); 0 none
  std::atomic<long> fast_calls{0};
  std::atomic<uint64_t> fallbacks[kReasons] = {};
  bool Fallback(FastModel* model, int reason) {
    (model != nullptr ? model->fallbacks : fallbacks)[reason].fetch_add(1, std::memory_order_relaxed);
    return false;
  }
#endif

  // Calls asked for or alive (Accept, InferCall, Call objects): the completion queue is shut
  // down only when none is left, so that no operation is ever started on a queue shut down.
  std::mutex live_mu;
  std::condition_variable live_cv;
  long live = 0;
  bool accepting = false;  // under live_mu: new calls are asked for
  static constexpr int kAccepts = 8;  // calls asked for at a time
  static constexpr int kPollers = 1;  // one: two only woke each other (an A/B: 4-8 % more CPU)

  void Born() {
    std::lock_guard<std::mutex> lock(live_mu);
    ++live;
  }
  void Died() {
    std::lock_guard<std::mutex> lock(live_mu);
    if (--live == 0) live_cv.notify_all();
  }
  void Poll() {
    void* tag;
    bool ok;
    while (queue->Next(&tag, &ok)) static_cast<Event*>(tag)->Proceed(ok);
  }
  // Asks the server for one more call, unless shutting down (a call asked for after the server's
  // Shutdown comes back at once, not ok).
  void AskForCall() {
    {
      std::lock_guard<std::mutex> lock(live_mu);
      if (!accepting) return;
      ++live;
    }
    new Accept(this);
  }
  void StartPollers(int count) {
    {
      std::lock_guard<std::mutex> lock(live_mu);
      accepting = true;
    }
    for (int i = 0; i < kAccepts; ++i) AskForCall();
    for (int i = 0; i < count; ++i) pollers.emplace_back([this] { Poll(); });
  }
  // After the server's Shutdown and StopWorkers: waits for the last call, then stops the pollers.
  // False when a call is still alive after kLastCallSeconds (one left pending on a batch queue
  // that nobody completes): the pollers then go on, and the front end must not be deleted.
  static constexpr int kLastCallSeconds = 10;
  bool StopPollers() {
    {
      std::unique_lock<std::mutex> lock(live_mu);
      if (!live_cv.wait_for(lock, std::chrono::seconds(kLastCallSeconds), [&] { return live == 0; })) {
        return false;
      }
    }
    queue->Shutdown();
    for (auto& poller : pollers) poller.join();
    pollers.clear();
    return true;
  }

  // The threads that run the Python handler. The pollers only queue a call for them and never
  // wait for the GIL themselves: they also accept connections and move every other call, health
  // checks included. Cheap calls go to one thread that answers them back to back: more threads
  // would only pass the GIL between them, each pass a thread wake-up. The others take the calls
  // whose onnxruntime runs (which release the GIL) are worth overlapping: requests over
  // small_max_bytes, and every request while the handler has recently taken longer than
  // kSideBySideMicros a call (a moving average over all calls).
  static constexpr long kSideBySideMicros = 500;
  struct Queue {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<InferCall*> calls;
  };
  Queue small, large;
  size_t small_max_bytes = 0;
  std::atomic<long> handler_micros{0};  // moving average of the handler's time per call
  std::atomic<bool> stopping{false};  // set under each queue's mu, so that no waiter misses it
  std::vector<std::thread> workers;

  void Timed(long micros) {  // one more handler time (races between threads only blur it)
    long average = handler_micros.load(std::memory_order_relaxed);
    handler_micros.store(average + (micros - average) / 16, std::memory_order_relaxed);
  }
  void Enqueue(InferCall* call, size_t bytes) {
    bool cheap = bytes <= small_max_bytes &&
                 handler_micros.load(std::memory_order_relaxed) <= kSideBySideMicros;
    Queue& queue = cheap ? small : large;
    {
      std::lock_guard<std::mutex> lock(queue.mu);
      queue.calls.push_back(call);
    }
    queue.cv.notify_one();
  }
  void Work(Queue& queue) {
    while (true) {
      InferCall* call;
      {
        std::unique_lock<std::mutex> lock(queue.mu);
        queue.cv.wait(lock, [&] { return stopping || !queue.calls.empty(); });
        if (queue.calls.empty()) break;  // stopping, nothing left
        call = queue.calls.front();
        queue.calls.pop_front();
      }
      call->Answer();
    }
    ForgetThreadState();
  }
  void StartWorkers(int count) {  // one for cheap calls, the others for costly ones
    workers.emplace_back([this] { Work(small); });
    for (int i = 1; i < count; ++i) workers.emplace_back([this] { Work(large); });  // count >= 2
  }
  void StopWorkers() {  // the GIL not held: the workers take it to forget their thread states
    for (Queue* queue : {&small, &large}) {
      std::lock_guard<std::mutex> lock(queue->mu);
      stopping = true;
    }
    small.cv.notify_all();
    large.cv.notify_all();
    for (auto& worker : workers) worker.join();
    workers.clear();
  }
  // Shutdown, in order: no new calls asked for; the server stops (waiting up to the deadline
  // for the calls in flight, then cancelling them); the workers answer what they hold; the last
  // call goes; the pollers stop. The GIL not held.
  bool Stop(std::chrono::system_clock::time_point deadline) {
    {
      std::lock_guard<std::mutex> lock(live_mu);
      accepting = false;
    }
    server->Shutdown(deadline);
    StopWorkers();
    if (!StopPollers()) return false;
    server->Wait();
    return true;
  }
};

Accept::Accept(Front* front) : front_(front), call_(std::make_unique<Stream>()) {
  front_->service.RequestCall(&call_->context, &call_->stream, front_->queue.get(),
                              front_->queue.get(), this);
}

void Accept::Proceed(bool ok) {
  Front* front = front_;
  if (ok) {  // a call: another is asked for, and this one is served
    front->AskForCall();
    if (call_->context.method() == front->fast_method) {
      new InferCall(front, std::move(call_));
    } else {
      new Call(front, std::move(call_));
    }
  }  // else the server is shutting down
  delete this;
  front->Died();
}

InferCall::InferCall(Front* front, std::unique_ptr<Stream> call)
    : front_(front), call_(std::move(call)) {
  front_->Born();
  front_->calls.fetch_add(1, std::memory_order_relaxed);
  call_->WhenDone(&done_);
  call_->stream.Read(&request_, &read_);
}

void InferCall::ReadDone(bool ok) {
  if (!ok) {  // no request: the client half-closed without one, or is gone
    answered_ = true;
    call_->stream.Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request message"),
                         &finish_);
    return;
  }
  counted_.store(true, std::memory_order_relaxed);
  front_->in_flight.fetch_add(1, std::memory_order_relaxed);
#ifdef EDGEWISE_FAST
  if (TryFast()) return;  // answered on this thread, the GIL never taken
#endif
  // Stays alive until answered: the call ends (FinishDone) only after its finish.
  front_->Enqueue(this, request_.Length());
}

void InferCall::FinishDone(bool) {
  Uncount();
  Unref();
}

void InferCall::CallDone(bool) { Unref(); }

void InferCall::Unref() {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) != 1) return;
  Front* front = front_;
  delete this;
  front->Died();
}

void InferCall::Uncount() {
  if (counted_.exchange(false, std::memory_order_relaxed)) {
    front_->in_flight.fetch_sub(1, std::memory_order_relaxed);
  }
}

void InferCall::Answer() {
  std::vector<grpc::Slice> slices;
  bool readable = request_.Dump(&slices).ok();
  // The token (the first sent), and the request id and W3C trace context (the last sent, as
  // grpcio's servicer reads them): string_refs into the call's metadata, alive until it ends.
  grpc::string_ref authorization, request_id, traceparent;
  bool has_authorization = false, has_request_id = false, has_traceparent = false;
  for (const auto& [key, value] : call_->context.client_metadata()) {
    if (key == "authorization") {
      if (!has_authorization) authorization = value;
      has_authorization = true;
    } else if (key == "x-request-id") {
      request_id = value;
      has_request_id = true;
    } else if (key == "traceparent") {
      traceparent = value;
      has_traceparent = true;
    }
  }
  double remaining = -1.0;  // no deadline
  auto deadline = call_->context.deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    remaining = std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
    if (remaining < 0) remaining = 0;
  }
  long in_flight = front_->in_flight.load(std::memory_order_relaxed);
  // Without a token, the client certificate may identify the caller (read only then).
  std::vector<std::string> peer;
  if (!has_authorization) peer = PeerIdentities(call_->context);

  Parsed answer;
  {
    Gil gil;
    PyObject* arg_body = readable ? ToBytes(slices) : PyBytes_FromStringAndSize("", 0);
    PyObject* arg_auth = OptionalText(has_authorization, authorization);
    PyObject* arg_request_id = OptionalText(has_request_id, request_id);
    PyObject* arg_traceparent = OptionalText(has_traceparent, traceparent);
    PyObject* arg_remaining = remaining < 0 ? (Py_INCREF(Py_None), Py_None) : PyFloat_FromDouble(remaining);
    PyObject* arg_in_flight = PyLong_FromLong(in_flight);
    PyObject* arg_token = PyLong_FromVoidPtr(this);
    PyObject* arg_peer = PyTuple_New(static_cast<Py_ssize_t>(peer.size()));
    for (size_t i = 0; arg_peer && i < peer.size(); ++i) {
      PyObject* item = PyUnicode_DecodeLatin1(peer[i].data(), static_cast<Py_ssize_t>(peer[i].size()), nullptr);
      if (!item) {
        Py_CLEAR(arg_peer);
        break;
      }
      PyTuple_SET_ITEM(arg_peer, static_cast<Py_ssize_t>(i), item);
    }
    PyObject* result = nullptr;
    if (arg_body && arg_auth && arg_remaining && arg_in_flight && arg_token && arg_peer &&
        arg_request_id && arg_traceparent) {
      PyObject* args[] = {arg_body,  arg_auth, arg_remaining,  arg_in_flight,
                          arg_token, arg_peer, arg_request_id, arg_traceparent};
      auto started = std::chrono::steady_clock::now();
      result = PyObject_Vectorcall(front_->handler, args, 8, nullptr);
      front_->Timed(static_cast<long>(std::chrono::duration_cast<std::chrono::microseconds>(
                                          std::chrono::steady_clock::now() - started)
                                          .count()));
    }
    Py_XDECREF(arg_body);
    Py_XDECREF(arg_auth);
    Py_XDECREF(arg_remaining);
    Py_XDECREF(arg_in_flight);
    Py_XDECREF(arg_token);
    Py_XDECREF(arg_peer);
    Py_XDECREF(arg_request_id);
    Py_XDECREF(arg_traceparent);
    if (PyErr_Occurred()) PyErr_Print();  // a bug in the handler: logged, the call gets INTERNAL
    answer = ParseAnswer(result);
    Py_XDECREF(result);

    // Answered with the GIL still held (the finish never waits), then the deferred work in the
    // same hold: taking the GIL again for it would cost another hand-over when others wait.
    PyObject* after = front_->after;  // the call may be gone once answered: keep what is needed
    bool run_after = answer.run_after;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (answer.code == kPending) {  // Front.complete answers it; until then it is in flight
        if (early_) {
          Parsed early = std::move(*early_);
          early_.reset();
          Deliver(early, lock);
        } else {
          pending_ = true;
        }
        return;
      }
      Deliver(answer, lock);
    }
    // From here on `this` may have been deleted (FinishDone on a poller).
    if (run_after && after != nullptr) {
      PyObject* done = PyObject_CallNoArgs(after);
      if (!done) PyErr_Print();
      Py_XDECREF(done);
    }
  }
}

bool InferCall::Complete(PyObject* result) {
  Parsed answer = ParseAnswer(result);
  if (answer.code == kPending) answer = Parsed();  // not an answer: INTERNAL
  std::unique_lock<std::mutex> lock(mu_);
  if (pending_) {
    pending_ = false;
    Deliver(answer, lock);
    return true;
  }
  if (answered_ || early_) return false;  // answered already
  early_ = std::move(answer);  // Answer() delivers it when the handler's kPending comes back
  return true;
}

void InferCall::Deliver(Parsed& answer, std::unique_lock<std::mutex>& lock) {
  // The model's work is over: the call stops counting against the in-flight limit now, not
  // when the client has read the answer (a client's next call would otherwise find its last
  // one still counted, and calls below the limit would be refused).
  Uncount();
  answered_ = true;
  for (const auto& [key, value] : answer.trailers) call_->context.AddTrailingMetadata(key, value);
  lock.unlock();
  if (answer.code == 0 && answer.has_reply) {
    grpc::ByteBuffer response(&answer.reply, 1);
    call_->stream.WriteAndFinish(response, grpc::WriteOptions(), grpc::Status::OK, &finish_);
  } else {
    int code = answer.code;
    if (code <= 0 || code > 16) code = static_cast<int>(grpc::StatusCode::INTERNAL);
    call_->stream.Finish(grpc::Status(static_cast<grpc::StatusCode>(code), answer.message),
                         &finish_);
  }
}

#ifdef EDGEWISE_FAST
// The fast path (see FastModel): true when the call was answered here, without the GIL; false
// sends it on to the Python handler (the reason counted), nothing done.
bool InferCall::TryFast() {
  std::shared_ptr<const FastTable> table = std::atomic_load(&front_->fast_table);
  if (!table || table->empty()) return false;
  auto began = std::chrono::steady_clock::now();
  // The request's bytes in one piece (one slice: no copy).
  grpc::Slice single;
  std::string joined;
  const uint8_t* data;
  size_t size;
  {
    std::vector<grpc::Slice> slices;
    if (!request_.Dump(&slices).ok()) return false;
    if (request_.Length() > front_->small_max_bytes) return front_->Fallback(nullptr, kLarge);
    size_t max_bytes = front_->fast_max_bytes.load(std::memory_order_relaxed);
    if (max_bytes > 0 && request_.Length() > max_bytes) return front_->Fallback(nullptr, kLimit);
    if (slices.size() == 1) {
      single = slices[0];
      data = single.begin();
      size = single.size();
    } else {
      for (const auto& s : slices) joined.append(reinterpret_cast<const char*>(s.begin()), s.size());
      data = reinterpret_cast<const uint8_t*>(joined.data());
      size = joined.size();
    }
  }
  Request req;
  if (!ParseRequest(data, size, &req)) return front_->Fallback(nullptr, kRequestForm);
  auto found = table->find(FastKey(req.model_name.str(), req.model_version.str()));
  if (found == table->end()) return front_->Fallback(nullptr, kNotInTable);
  FastModel& model = *found->second;
  std::shared_ptr<FastModel> hold = found->second;  // alive whatever the table becomes
  // The inputs: exactly the model's, one batch size, raw all or none.
  const bool raw = !req.raw.empty();
  if (req.inputs.size() != model.inputs.size() || (raw && req.raw.size() != req.inputs.size()))
    return front_->Fallback(&model, kInputs);
  std::vector<int> order(model.inputs.size(), -1);  // the model's input i is the request's order[i]
  for (size_t j = 0; j < req.inputs.size(); ++j) {
    size_t i = 0;
    while (i < model.inputs.size() && !req.inputs[j].name.eq(model.inputs[i].name)) ++i;
    if (i == model.inputs.size() || order[i] != -1) return front_->Fallback(&model, kInputs);
    order[i] = static_cast<int>(j);
  }
  std::vector<std::string> buffers(model.inputs.size());
  std::vector<OrtValue*> values(model.inputs.size(), nullptr);
  std::vector<const char*> input_names(model.inputs.size());
  const OrtApi* api = model.session->api;
  auto release_values = [&] {
    for (OrtValue* v : values)
      if (v != nullptr) api->ReleaseValue(v);
  };
  int64_t rows = -1;
  for (size_t i = 0; i < model.inputs.size(); ++i) {
    const FastInput& spec = model.inputs[i];
    const InputTensor& t = req.inputs[static_cast<size_t>(order[i])];
    bool fits = t.datatype.eq(spec.datatype) && t.shape.size() == spec.shape.size() && !t.shape.empty();
    int64_t count = 1;
    for (size_t d = 0; fits && d < t.shape.size(); ++d) {
      fits = t.shape[d] >= 0 && (spec.shape[d] == -1 || spec.shape[d] == t.shape[d]) &&
             t.shape[d] < (int64_t{1} << 31);
      count *= t.shape[d];
      fits = fits && count < (int64_t{1} << 31);
    }
    if (fits) fits = rows == -1 || rows == t.shape[0];
    if (fits) rows = t.shape[0];
    if (fits && raw && t.typed_fields != 0) fits = false;
    if (!fits || count == 0 ||
        !DecodeInput(spec, t, raw ? &req.raw[static_cast<size_t>(order[i])] : nullptr, count, &buffers[i])) {
      release_values();
      return front_->Fallback(&model, kInputs);
    }
    OrtStatus* status = api->CreateTensorWithDataAsOrtValue(
        model.session->cpu, buffers[i].data(), buffers[i].size(), t.shape.data(), t.shape.size(),
        spec.element, &values[i]);
    if (status != nullptr) {
      api->ReleaseStatus(status);
      release_values();
      return front_->Fallback(&model, kInputs);
    }
    input_names[i] = spec.name.c_str();
  }
  // The outputs answered: those asked for (each once, each the model's), else all.
  std::vector<std::string> answered;
  if (req.outputs.empty()) {
    answered = model.outputs;
  } else {
    for (const View& name : req.outputs) {
      std::string text = name.str();
      bool known = std::find(model.outputs.begin(), model.outputs.end(), text) != model.outputs.end();
      bool twice = std::find(answered.begin(), answered.end(), text) != answered.end();
      if (!known || twice) {
        release_values();
        return front_->Fallback(&model, kInputs);
      }
      answered.push_back(std::move(text));
    }
  }
  std::vector<const char*> run_names;
  for (const auto& name : answered) run_names.push_back(name.c_str());
  int watched = -1;
  if (model.monitored && !model.watched.empty()) {
    for (size_t o = 0; o < answered.size(); ++o)
      if (answered[o] == model.watched) watched = static_cast<int>(o);
    if (watched < 0) {
      watched = static_cast<int>(run_names.size());
      run_names.push_back(model.watched.c_str());
    }
  }
  // The labels (request_context.py): the request's id, else the caller's x-request-id, else one
  // made here; trailers echo the id where the caller sent x-request-id, and the trace id.
  std::string sent_id, traceparent;
  bool has_sent_id = false, has_traceparent = false;
  for (const auto& [key, value] : call_->context.client_metadata()) {
    if (key == "x-request-id") {
      sent_id.assign(value.data(), value.size());
      has_sent_id = true;
    } else if (key == "traceparent") {
      traceparent.assign(value.data(), value.size());
      has_traceparent = true;
    }
  }
  bool sent = has_sent_id && !sent_id.empty();
  if (model.keeps_keyed && (req.id.size > 0 || sent)) {
    release_values();
    return front_->Fallback(&model, kKeyed);
  }
  // Admission: the limit Python set on the calls in flight (this one included); at or over it
  // Python decides (it sheds, with its metrics and trailers).
  long limit = front_->fast_limit.load(std::memory_order_relaxed);
  if (limit > 0 && front_->in_flight.load(std::memory_order_relaxed) +
                       front_->other_in_flight.load(std::memory_order_relaxed) > limit) {
    release_values();
    return front_->Fallback(&model, kLimit);
  }
  auto deadline = call_->context.deadline();
  if (deadline != std::chrono::system_clock::time_point::max() &&
      std::chrono::system_clock::now() >= deadline) {
    release_values();
    return front_->Fallback(&model, kDeadline);
  }
  std::vector<OrtValue*> results(run_names.size(), nullptr);
  OrtStatus* status = api->Run(model.session->session, nullptr, input_names.data(), values.data(),
                               values.size(), run_names.data(), run_names.size(), results.data());
  release_values();
  auto release_results = [&] {
    for (OrtValue* v : results)
      if (v != nullptr) api->ReleaseValue(v);
  };
  if (status != nullptr) {
    api->ReleaseStatus(status);
    release_results();
    return front_->Fallback(&model, kRun);  // Python runs it again and says why
  }
  // Each result: a numeric tensor, its shape, kind and data.
  struct Out {
    OutputKind kind;
    std::vector<int64_t> shape;
    const uint8_t* data = nullptr;
    size_t count = 0;
  };
  std::vector<Out> outs(results.size());
  for (size_t o = 0; o < results.size(); ++o) {
    OrtTensorTypeAndShapeInfo* info = nullptr;
    ONNXTensorElementDataType element = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
    size_t rank = 0;
    void* raw_data = nullptr;
    int is_tensor = 0;
    OrtStatus* s = api->IsTensor(results[o], &is_tensor);
    if (s == nullptr && is_tensor) s = api->GetTensorTypeAndShape(results[o], &info);
    if (s == nullptr && info != nullptr) s = api->GetTensorElementType(info, &element);
    if (s == nullptr && info != nullptr) s = api->GetDimensionsCount(info, &rank);
    if (s == nullptr && info != nullptr) {
      outs[o].shape.resize(rank);
      if (rank > 0) s = api->GetDimensions(info, outs[o].shape.data(), rank);
    }
    if (s == nullptr && info != nullptr) s = api->GetTensorShapeElementCount(info, &outs[o].count);
    if (info != nullptr) api->ReleaseTensorTypeAndShapeInfo(info);
    bool ok = s == nullptr && is_tensor && KindOf(element, &outs[o].kind);
    if (s != nullptr) api->ReleaseStatus(s);
    if (ok) {
      s = api->GetTensorMutableData(results[o], &raw_data);
      if (s != nullptr) {
        api->ReleaseStatus(s);
        ok = false;
      }
    }
    if (!ok) {
      release_results();
      return front_->Fallback(&model, kRun);
    }
    outs[o].data = static_cast<const uint8_t*>(raw_data);
  }
  std::string request_id = req.id.size ? req.id.str() : (sent ? sent_id : NewRequestId());
  Parsed answer;
  answer.code = 0;
  if (sent && Echoable(request_id)) answer.trailers.emplace_back("x-request-id", request_id);
  if (has_traceparent) {
    std::string trace = TraceIdOf(traceparent);
    if (!trace.empty()) answer.trailers.emplace_back("x-trace-id", trace);
  }
  Writer w;
  w.Text(1, model.name);
  w.Text(2, model.version);
  w.Text(3, request_id);
  std::vector<std::pair<const uint8_t*, size_t>> raws;
  for (size_t o = 0; o < answered.size(); ++o)
    WriteOutput(w, answered[o], outs[o].kind, outs[o].shape, outs[o].data, outs[o].count, raw, &raws);
  for (const auto& [p, n] : raws) w.Bytes(6, p, n);
  // The capture's copy of a sampled call (drained by Python: fast_path.py).
  if (model.capture_rate > 0.0) {
    std::string capture_id = req.id.size ? req.id.str() : (sent ? sent_id : std::string());
    if (CaptureSampled(capture_id, model.capture_rate)) {
      CaptureRecord record;
      record.request_id = std::move(capture_id);
      record.time_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                           std::chrono::system_clock::now().time_since_epoch()).count();
      record.rows = rows;
      for (size_t j = 0; j < req.inputs.size(); ++j) {
        size_t i = 0;
        while (static_cast<size_t>(order[i]) != j) ++i;
        record.input_index.push_back(static_cast<int>(i));
        record.inputs.push_back(buffers[i]);
        record.input_shapes.push_back(req.inputs[j].shape);
        record.bytes += buffers[i].size();
      }
      record.named = !req.outputs.empty();
      for (size_t o = 0; o < answered.size(); ++o) {
        const Out& out = outs[o];
        if (record.named) record.output_names.push_back(answered[o]);
        record.output_types.push_back(out.kind.datatype);
        record.outputs.emplace_back(reinterpret_cast<const char*>(out.data), out.count * out.kind.item);
        record.bytes += record.outputs.back().size();
      }
      model.Capture(std::move(record));
    }
  }
  // The monitor's copy of the rows (drained by Python: fast_path.py).
  if (model.monitored) {
    RingRecord record;
    record.rows = rows;
    record.inputs = std::move(buffers);
    if (watched >= 0) {
      const Out& out = outs[static_cast<size_t>(watched)];
      record.output.assign(reinterpret_cast<const char*>(out.data), out.count * out.kind.item);
      record.output_shape = out.shape;
    }
    model.Offer(std::move(record));
  }
  release_results();
  answer.reply = grpc::Slice(w.out);
  answer.has_reply = true;
  model.Observe(std::chrono::duration<double>(std::chrono::steady_clock::now() - began).count());
  front_->FastAnswered();
  std::unique_lock<std::mutex> lock(mu_);
  Deliver(answer, lock);  // `this` may be gone once it returns
  return true;
}
#endif  // EDGEWISE_FAST

Call::Call(Front* front, std::unique_ptr<Stream> call) : front_(front), call_(std::move(call)) {
  front_->Born();
  front_->calls.fetch_add(1, std::memory_order_relaxed);
  Entry entry(this);
  StartRelay();
  call_->WhenDone(&done_);
}

void Call::Release() {
  if (released_) return;
  released_ = true;
  Front* front = front_;
  delete this;
  front->Died();
}

void Call::StartRelay() {
  front_->relayed.fetch_add(1, std::memory_order_relaxed);
  grpc::GenericServerContext& context = call_->context;
  upstream_context_ = std::make_unique<grpc::ClientContext>();
  auto deadline = context.deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) upstream_context_->set_deadline(deadline);
  for (const auto& [key, value] : context.client_metadata()) {
    std::string name(key.data(), key.size());
    if (Forwardable(name)) upstream_context_->AddMetadata(name, std::string(value.data(), value.size()));
  }
  for (const auto& identity : PeerIdentities(context)) upstream_context_->AddMetadata(kPeerHeader, identity);
  upstream_done_ = false;
  write_hold_ = read_hold_ = true;
  front_->upstream->PrepareBidiStreamingCall(upstream_context_.get(), context.method(),
                                             grpc::StubOptions(), &upstream_);
  upstream_.AddMultipleHolds(2);  // one for each direction we still drive from the server side
  upstream_.StartRead(&from_upstream_);
  ReadFromClient();
  upstream_.StartCall();
}

void Call::ReadFromClient() {
  if (reading_ || client_closed_ || finished_) return;
  reading_ = true;
  call_->stream.Read(&from_client_, &read_);
}

void Call::ClientReadDone(bool ok) {
  Entry entry(this);
  reading_ = false;
  if (!ok) client_closed_ = true;
  if (upstream_done_ || !write_hold_) return;  // nothing more goes upstream
  if (ok) {
    upstream_.StartWrite(&from_client_);
  } else {  // the client has half-closed (or is gone: then the relayed call's end tells)
    upstream_.StartWritesDone();
    ReleaseWriteHold();
  }
}

void Call::ClientWriteDone(bool ok) {
  Entry entry(this);
  writing_to_client_ = false;
  if (!ok) {  // the client is gone: no more reads from upstream; its status ends the call
    if (upstream_context_) upstream_context_->TryCancel();
    if (!upstream_done_) ReleaseReadHold();
    if (finish_pending_) FinishLocked(pending_status_);
    return;
  }
  if (finish_pending_) {
    FinishLocked(pending_status_);
  } else if (!upstream_done_ && read_hold_) {
    upstream_.StartRead(&from_upstream_);
  }
}

void Call::FinishDone(bool) {
  Entry entry(this);
  finish_done_ = true;
}

void Call::CallDone(bool) {
  Entry entry(this);
  call_done_ = true;
  // Over before its status was sent: the client cancelled it (or its deadline passed, or the
  // server is stopping); the relayed call goes too.
  if (!finished_ && upstream_context_) upstream_context_->TryCancel();
}

void Call::UpstreamWriteDone(bool ok) {
  Entry entry(this);
  if (!ok) {  // the relayed call has ended; its status will tell
    ReleaseWriteHold();
    return;
  }
  ReadFromClient();
}

void Call::UpstreamReadDone(bool ok) {
  Entry entry(this);
  if (!ok) {  // the upstream call is over (a gRPC server's status ends the whole call):
    ReleaseReadHold();   // its status follows in UpstreamDone, which must not wait for the
    ReleaseWriteHold();  // client to half-close a stream nobody reads any more
    return;
  }
  if (finished_) {
    ReleaseReadHold();
    return;
  }
  writing_to_client_ = true;
  call_->stream.Write(from_upstream_, &write_);
}

void Call::UpstreamDone(const grpc::Status& status) {
  Entry entry(this);
  upstream_done_ = true;
  if (!finished_) {
    for (const auto& [key, value] : upstream_context_->GetServerTrailingMetadata()) {
      call_->context.AddTrailingMetadata(std::string(key.data(), key.size()),
                                         std::string(value.data(), value.size()));
    }
    if (writing_to_client_) {
      finish_pending_ = true;
      pending_status_ = status;
    } else {
      FinishLocked(status);
    }
  }
}

void Call::ReleaseWriteHold() {
  if (write_hold_) {
    write_hold_ = false;
    upstream_.RemoveHold();
  }
}

void Call::ReleaseReadHold() {
  if (read_hold_) {
    read_hold_ = false;
    upstream_.RemoveHold();
  }
}

void Call::FinishLocked(const grpc::Status& status) {
  if (finished_) return;
  finished_ = true;
  finish_pending_ = false;
  call_->stream.Finish(status, &finish_);
}


// ---- TLS on the public port ------------------------------------------------------------------

// What the public port serves with: plaintext (no certificate), TLS, or mutual TLS (a client CA).
struct TlsFiles {
  std::string cert, key, client_ca;  // PEM files; cert empty: plaintext
  int refresh_seconds = 2;           // how often the files are read again
};

// A file the port needs, checked now (gRPC would only log its error and fail every handshake):
// false with a Python exception naming the file when it cannot be read or holds no PEM block.
bool CheckPem(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    PyErr_Format(PyExc_OSError, "%s %s: cannot read", what, path.c_str());
    return false;
  }
  std::string data(std::istreambuf_iterator<char>(in), {});
  if (data.find("-----BEGIN") == std::string::npos) {
    PyErr_Format(PyExc_ValueError, "%s %s: not a PEM file", what, path.c_str());
    return false;
  }
  return true;
}

// The port's credentials. With TLS, gRPC's file watcher reads the key, the certificate chain and
// the client CA bundle again every refresh_seconds, and new connections get what it last read:
// certificates rotate without a restart, as on grpcio (replace the files atomically: a key and
// certificate read mid-write do not match). With a client CA, a client must present a
// certificate it signed, or the handshake fails (mutual TLS).
std::shared_ptr<grpc::ServerCredentials> PortCredentials(const TlsFiles& files) {
  if (files.cert.empty()) return grpc::InsecureServerCredentials();
  auto provider = std::make_shared<grpc::experimental::FileWatcherCertificateProvider>(
      files.key, files.cert, files.client_ca, static_cast<unsigned int>(files.refresh_seconds));
  grpc::experimental::TlsServerCredentialsOptions options(provider);
  options.watch_identity_key_cert_pairs();
  if (files.client_ca.empty()) {
    options.set_cert_request_type(GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  } else {
    options.watch_root_certs();
    options.set_cert_request_type(GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  }
  return grpc::experimental::TlsServerCredentials(options);
}

// Checks the TLS settings; false with a Python exception set.
bool CheckTls(const TlsFiles& files) {
  if (files.cert.empty() != files.key.empty()) {
    PyErr_SetString(PyExc_ValueError, "tls_cert_file and tls_key_file: give both or neither");
    return false;
  }
  if (files.cert.empty()) {
    if (!files.client_ca.empty()) {
      PyErr_SetString(PyExc_ValueError, "tls_client_ca_file needs tls_cert_file and tls_key_file");
      return false;
    }
    return true;
  }
  if (files.refresh_seconds < 1) {
    PyErr_SetString(PyExc_ValueError, "tls_refresh_seconds must be at least 1");
    return false;
  }
  return CheckPem(files.cert, "TLS certificate") && CheckPem(files.key, "TLS key") &&
         (files.client_ca.empty() || CheckPem(files.client_ca, "TLS client CA"));
}

#ifdef EDGEWISE_FAST
// ---- FastModel, the Python handle of one model version served on the fast path ----

struct FastModelObject {
  PyObject_HEAD
  std::shared_ptr<FastModel>* model;
};

void FastModelDealloc(PyObject* self) {
  auto* object = reinterpret_cast<FastModelObject*>(self);
  delete object->model;  // the session goes with the last request that holds it
  object->model = nullptr;
  Py_TYPE(self)->tp_free(self);
}

bool ElementOf(const std::string& datatype, ONNXTensorElementDataType* element, size_t* item) {
  if (datatype == "FP32") { *element = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; *item = 4; return true; }
  if (datatype == "FP64") { *element = ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE; *item = 8; return true; }
  if (datatype == "INT32") { *element = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32; *item = 4; return true; }
  if (datatype == "INT64") { *element = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64; *item = 8; return true; }
  return false;
}

// FastModel(name, version, inputs, outputs, watched, monitored, session, ring_max_rows):
// inputs ((name, datatype, shape), ...) with datatype FP32, FP64, INT32 or INT64; outputs the
// model's output names in order; watched the monitor's prediction output ("" none); session the
// C API session's capsule (_ort Session.shared).
int FastModelInit(PyObject* self, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"name", "version", "inputs", "outputs", "watched",
                                    "monitored", "session", "ring_max_rows", "keeps_keyed",
                                    "capture_rate", "capture_max_records", "capture_max_bytes",
                                    nullptr};
  const char* name;
  const char* version;
  const char* watched;
  PyObject* inputs;
  PyObject* outputs;
  PyObject* capsule;
  int monitored;
  Py_ssize_t ring_max_rows;
  int keeps_keyed = 0;
  double capture_rate = 0.0;
  Py_ssize_t capture_max_records = 0, capture_max_bytes = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ssOOspOn|pdnn", const_cast<char**>(keywords), &name,
                                   &version, &inputs, &outputs, &watched, &monitored, &capsule,
                                   &ring_max_rows, &keeps_keyed, &capture_rate,
                                   &capture_max_records, &capture_max_bytes))
    return -1;
  auto* shared = static_cast<EdgewiseOrtShared*>(PyCapsule_GetPointer(capsule, EDGEWISE_ORT_SHARED_CAPSULE));
  if (shared == nullptr) return -1;
  auto model = std::make_shared<FastModel>();
  model->name = name;
  model->version = version;
  model->watched = watched;
  model->monitored = monitored != 0;
  model->keeps_keyed = keeps_keyed != 0;
  model->ring_max_rows = ring_max_rows > 0 ? static_cast<size_t>(ring_max_rows) : 0;
  model->capture_rate = capture_rate;
  model->capture_max_records = capture_max_records > 0 ? static_cast<size_t>(capture_max_records) : 0;
  model->capture_max_bytes = capture_max_bytes > 0 ? static_cast<size_t>(capture_max_bytes) : 0;
  PyObject* seq = PySequence_Fast(inputs, "inputs must be a sequence");
  if (seq == nullptr) return -1;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    const char* input_name;
    const char* datatype;
    PyObject* shape;
    if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "ssO", &input_name, &datatype, &shape)) {
      Py_DECREF(seq);
      return -1;
    }
    FastInput spec;
    spec.name = input_name;
    spec.datatype = datatype;
    if (!ElementOf(spec.datatype, &spec.element, &spec.item)) {
      PyErr_Format(PyExc_ValueError, "input '%s': datatype %s is not served on the fast path",
                   input_name, datatype);
      Py_DECREF(seq);
      return -1;
    }
    PyObject* dims = PySequence_Fast(shape, "shape must be a sequence");
    if (dims == nullptr) {
      Py_DECREF(seq);
      return -1;
    }
    for (Py_ssize_t d = 0; d < PySequence_Fast_GET_SIZE(dims); ++d)
      spec.shape.push_back(PyLong_AsLongLong(PySequence_Fast_GET_ITEM(dims, d)));
    Py_DECREF(dims);
    model->inputs.push_back(std::move(spec));
  }
  Py_DECREF(seq);
  seq = PySequence_Fast(outputs, "outputs must be a sequence");
  if (seq == nullptr) return -1;
  for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); ++i) {
    const char* output = PyUnicode_AsUTF8(PySequence_Fast_GET_ITEM(seq, i));
    if (output == nullptr) {
      Py_DECREF(seq);
      return -1;
    }
    model->outputs.emplace_back(output);
  }
  Py_DECREF(seq);
  if (PyErr_Occurred()) return -1;
  shared->Ref();
  model->session = shared;
  auto* object = reinterpret_cast<FastModelObject*>(self);
  delete object->model;
  object->model = new std::shared_ptr<FastModel>(std::move(model));
  return 0;
}

FastModel* ModelOf(PyObject* self) {
  auto* object = reinterpret_cast<FastModelObject*>(self);
  if (object->model == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "the FastModel is not initialised");
    return nullptr;
  }
  return object->model->get();
}

// counts() -> (ok, buckets, seconds, fallbacks, dropped_rows): the calls answered here, their
// latency histogram (LATENCY_BUCKETS and +Inf, not cumulative) and its sum, the calls sent to
// Python by reason, the monitor's rows dropped by a full ring.
PyObject* FastModelCounts(PyObject* self, PyObject*) {
  FastModel* model = ModelOf(self);
  if (model == nullptr) return nullptr;
  PyObject* buckets = PyTuple_New(kBuckets);
  if (buckets == nullptr) return nullptr;
  for (int b = 0; b < kBuckets; ++b)
    PyTuple_SET_ITEM(buckets, b, PyLong_FromUnsignedLongLong(model->buckets[b].load()));
  PyObject* fallbacks = PyTuple_New(kReasons);
  if (fallbacks == nullptr) {
    Py_DECREF(buckets);
    return nullptr;
  }
  for (int r = 0; r < kReasons; ++r)
    PyTuple_SET_ITEM(fallbacks, r, PyLong_FromUnsignedLongLong(model->fallbacks[r].load()));
  return Py_BuildValue("(KNdNK)", static_cast<unsigned long long>(model->ok.load()), buckets,
                       static_cast<double>(model->nanos.load()) / 1e9, fallbacks,
                       static_cast<unsigned long long>(model->dropped_rows.load()));
}

// drain() -> None, or (rows, inputs, output, output_shape): what the ring held, taken out:
// each record's rows, each input's bytes of every record one after the other, the watched
// output's likewise (b"" none) and the trailing dimensions of its shape (a record whose output
// has other trailing dimensions than the first's is dropped, its rows counted).
PyObject* FastModelDrain(PyObject* self, PyObject*) {
  FastModel* model = ModelOf(self);
  if (model == nullptr) return nullptr;
  std::deque<RingRecord> taken;
  {
    std::lock_guard<std::mutex> lock(model->ring_mu);
    taken.swap(model->ring);
    model->ring_rows = 0;
  }
  if (taken.empty()) Py_RETURN_NONE;
  std::vector<int64_t> tail;
  bool has_tail = false;
  std::vector<std::string> inputs(model->inputs.size());
  std::string output;
  std::vector<int64_t> rows;
  for (RingRecord& record : taken) {
    std::vector<int64_t> this_tail;
    if (!record.output_shape.empty())
      this_tail.assign(record.output_shape.begin() + 1, record.output_shape.end());
    if (!has_tail) {
      tail = this_tail;
      has_tail = true;
    } else if (this_tail != tail) {
      model->dropped_rows.fetch_add(static_cast<uint64_t>(record.rows));
      continue;
    }
    for (size_t i = 0; i < inputs.size() && i < record.inputs.size(); ++i) inputs[i] += record.inputs[i];
    output += record.output;
    rows.push_back(record.rows);
  }
  PyObject* py_rows = PyTuple_New(static_cast<Py_ssize_t>(rows.size()));
  PyObject* py_inputs = PyTuple_New(static_cast<Py_ssize_t>(inputs.size()));
  PyObject* py_tail = PyTuple_New(static_cast<Py_ssize_t>(tail.size()));
  if (py_rows == nullptr || py_inputs == nullptr || py_tail == nullptr) {
    Py_XDECREF(py_rows);
    Py_XDECREF(py_inputs);
    Py_XDECREF(py_tail);
    return nullptr;
  }
  for (size_t i = 0; i < rows.size(); ++i)
    PyTuple_SET_ITEM(py_rows, static_cast<Py_ssize_t>(i), PyLong_FromLongLong(rows[i]));
  for (size_t i = 0; i < inputs.size(); ++i)
    PyTuple_SET_ITEM(py_inputs, static_cast<Py_ssize_t>(i),
                     PyBytes_FromStringAndSize(inputs[i].data(), static_cast<Py_ssize_t>(inputs[i].size())));
  for (size_t i = 0; i < tail.size(); ++i)
    PyTuple_SET_ITEM(py_tail, static_cast<Py_ssize_t>(i), PyLong_FromLongLong(tail[i]));
  return Py_BuildValue("(NNy#N)", py_rows, py_inputs, output.data(),
                       static_cast<Py_ssize_t>(output.size()), py_tail);
}

// drain_capture() -> (records, dropped): the captured calls waiting, taken out, and the calls
// dropped by a full buffer since the last drain. A record: (request_id, time_ns, rows, inputs,
// named, outputs, datatypes): inputs ((model input index, bytes, shape), ...) in the request's
// order; named the output names the call asked for (None: every output, the model's order);
// outputs each answered output's raw bytes and datatypes their datatypes, in answer order.
PyObject* FastModelDrainCapture(PyObject* self, PyObject*) {
  FastModel* model = ModelOf(self);
  if (model == nullptr) return nullptr;
  std::deque<CaptureRecord> taken;
  {
    std::lock_guard<std::mutex> lock(model->capture_mu);
    taken.swap(model->captured);
    model->captured_bytes = 0;
  }
  unsigned long long dropped = model->capture_dropped.exchange(0);
  PyObject* records = PyList_New(static_cast<Py_ssize_t>(taken.size()));
  if (records == nullptr) return nullptr;
  Py_ssize_t k = 0;
  for (CaptureRecord& r : taken) {
    PyObject* inputs = PyTuple_New(static_cast<Py_ssize_t>(r.inputs.size()));
    PyObject* outputs = PyTuple_New(static_cast<Py_ssize_t>(r.outputs.size()));
    PyObject* types = PyTuple_New(static_cast<Py_ssize_t>(r.outputs.size()));
    PyObject* named = nullptr;
    if (r.named) {
      named = PyTuple_New(static_cast<Py_ssize_t>(r.output_names.size()));
    } else {
      named = Py_None;
      Py_INCREF(named);
    }
    if (inputs == nullptr || outputs == nullptr || types == nullptr || named == nullptr) {
      Py_XDECREF(inputs);
      Py_XDECREF(outputs);
      Py_XDECREF(types);
      Py_XDECREF(named);
      Py_DECREF(records);
      return nullptr;
    }
    for (size_t i = 0; i < r.inputs.size(); ++i) {
      PyObject* shape = PyTuple_New(static_cast<Py_ssize_t>(r.input_shapes[i].size()));
      if (shape != nullptr)
        for (size_t d = 0; d < r.input_shapes[i].size(); ++d)
          PyTuple_SET_ITEM(shape, static_cast<Py_ssize_t>(d), PyLong_FromLongLong(r.input_shapes[i][d]));
      PyTuple_SET_ITEM(inputs, static_cast<Py_ssize_t>(i),
                       Py_BuildValue("(iy#N)", r.input_index[i], r.inputs[i].data(),
                                     static_cast<Py_ssize_t>(r.inputs[i].size()), shape));
    }
    for (size_t o = 0; o < r.outputs.size(); ++o) {
      PyTuple_SET_ITEM(outputs, static_cast<Py_ssize_t>(o),
                       PyBytes_FromStringAndSize(r.outputs[o].data(), static_cast<Py_ssize_t>(r.outputs[o].size())));
      PyTuple_SET_ITEM(types, static_cast<Py_ssize_t>(o), PyUnicode_InternFromString(r.output_types[o]));
      if (r.named)
        PyTuple_SET_ITEM(named, static_cast<Py_ssize_t>(o),
                         PyUnicode_FromStringAndSize(r.output_names[o].data(),
                                                     static_cast<Py_ssize_t>(r.output_names[o].size())));
    }
    PyObject* record = Py_BuildValue("(s#LLNNNN)", r.request_id.data(),
                                     static_cast<Py_ssize_t>(r.request_id.size()),
                                     static_cast<long long>(r.time_ns), static_cast<long long>(r.rows),
                                     inputs, named, outputs, types);
    if (record == nullptr || PyErr_Occurred()) {
      Py_XDECREF(record);
      Py_DECREF(records);
      return nullptr;
    }
    PyList_SET_ITEM(records, k++, record);
  }
  return Py_BuildValue("(NK)", records, dropped);
}

PyMethodDef kFastModelMethods[] = {
    {"drain_capture", FastModelDrainCapture, METH_NOARGS,
     "drain_capture() -> (records, dropped): the captured calls, taken out"},
    {"counts", FastModelCounts, METH_NOARGS,
     "counts() -> (ok, buckets, seconds, fallbacks, dropped_rows)"},
    {"drain", FastModelDrain, METH_NOARGS,
     "drain() -> None or (rows, inputs, output, output_tail): the monitor's ring, taken out"},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject kFastModelType = {PyVarObject_HEAD_INIT(nullptr, 0)};
#endif  // EDGEWISE_FAST

// ---- the Python object -----------------------------------------------------------------------

struct FrontObject {
  PyObject_HEAD
  Front* front;
  int port;
};

void FrontDealloc(PyObject* self) {
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (object->front) {
    bool stopped = true;
    Py_BEGIN_ALLOW_THREADS
    if (object->front->server) stopped = object->front->Stop(std::chrono::system_clock::now());
    Py_END_ALLOW_THREADS
    if (stopped) {  // else a call still waits for Front.complete: the front end stays, leaked
      Py_XDECREF(object->front->handler);
      Py_XDECREF(object->front->after);
      delete object->front;
    }
  }
  Py_TYPE(self)->tp_free(self);
}

// Front(address, upstream, handler, after, fast_method, max_message_bytes, reuse_port, handlers,
//       small_max_bytes=65536, tls_cert_file="", tls_key_file="", tls_client_ca_file="",
//       tls_refresh_seconds=2): TLS on the port with a certificate and key (empty: plaintext),
//       mutual TLS with a client CA too.
int FrontInit(PyObject* self, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"address", "upstream", "handler", "after", "fast_method",
                                    "max_message_bytes", "reuse_port", "handlers",
                                    "small_max_bytes", "tls_cert_file", "tls_key_file",
                                    "tls_client_ca_file", "tls_refresh_seconds", nullptr};
  const char* address;
  const char* upstream;
  const char* fast_method;
  PyObject* handler;
  PyObject* after;
  int max_message_bytes;
  int reuse_port;
  int handlers;
  Py_ssize_t small_max_bytes = 64 * 1024;
  const char* tls_cert = "";
  const char* tls_key = "";
  const char* tls_client_ca = "";
  TlsFiles tls;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ssOOsipi|nsssi", const_cast<char**>(keywords),
                                   &address, &upstream, &handler, &after, &fast_method,
                                   &max_message_bytes, &reuse_port, &handlers, &small_max_bytes,
                                   &tls_cert, &tls_key, &tls_client_ca, &tls.refresh_seconds)) {
    return -1;
  }
  tls.cert = tls_cert;
  tls.key = tls_key;
  tls.client_ca = tls_client_ca;
  if (!CheckTls(tls)) return -1;
  if (handlers < 2 || handlers > 256) {
    PyErr_SetString(PyExc_ValueError, "handlers must be between 2 and 256");
    return -1;
  }
  if (small_max_bytes < 0) {
    PyErr_SetString(PyExc_ValueError, "small_max_bytes must not be negative");
    return -1;
  }
  if (!PyCallable_Check(handler) || !PyCallable_Check(after)) {
    PyErr_SetString(PyExc_TypeError, "handler and after must be callable");
    return -1;
  }
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (object->front) {
    PyErr_SetString(PyExc_RuntimeError, "already initialised");
    return -1;
  }
  auto front = std::unique_ptr<Front, void (*)(Front*)>(new Front(), [](Front* f) {
    Py_XDECREF(f->handler);
    Py_XDECREF(f->after);
    delete f;
  });
  Py_INCREF(handler);
  front->handler = handler;
  Py_INCREF(after);
  front->after = after;
  front->fast_method = fast_method;
  front->small_max_bytes = static_cast<size_t>(small_max_bytes);
  grpc::ChannelArguments channel_args;
  channel_args.SetMaxReceiveMessageSize(max_message_bytes);
  channel_args.SetMaxSendMessageSize(max_message_bytes);
  front->upstream = std::make_unique<grpc::GenericStub>(
      grpc::CreateCustomChannel(upstream, grpc::InsecureChannelCredentials(), channel_args));

  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, PortCredentials(tls), &port);
  builder.SetMaxReceiveMessageSize(max_message_bytes);
  builder.SetMaxSendMessageSize(max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, reuse_port ? 1 : 0);
  builder.RegisterAsyncGenericService(&front->service);
  front->queue = builder.AddCompletionQueue();
  Py_BEGIN_ALLOW_THREADS
  front->server = builder.BuildAndStart();
  Py_END_ALLOW_THREADS
  if (!front->server || port == 0) {
    PyErr_Format(PyExc_OSError, "cannot bind %s", address);
    return -1;
  }
  front->StartWorkers(handlers);
  front->StartPollers(Front::kPollers);
  object->front = front.release();
  object->port = port;
  return 0;
}

PyObject* FrontShutdown(PyObject* self, PyObject* args) {
  double grace;
  if (!PyArg_ParseTuple(args, "d", &grace)) return nullptr;
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (!object->front || !object->front->server) Py_RETURN_NONE;
  auto deadline = std::chrono::system_clock::now() +
                  std::chrono::duration_cast<std::chrono::system_clock::duration>(
                      std::chrono::duration<double>(grace > 0 ? grace : 0));
  bool stopped;
  Py_BEGIN_ALLOW_THREADS
  stopped = object->front->Stop(deadline);  // stops accepting; waits for calls, then cancels
  Py_END_ALLOW_THREADS
  if (!stopped) {
    PyErr_SetString(PyExc_RuntimeError, "a call still waits for Front.complete after shutdown");
    return nullptr;
  }
  object->front->server.reset();
  Py_RETURN_NONE;
}

// complete(token, answer): the answer of a call the handler left pending (kPending), given
// the token it was called with. Each pending call must be completed exactly once.
PyObject* FrontComplete(PyObject* self, PyObject* args) {
  PyObject* token;
  PyObject* answer;
  if (!PyArg_ParseTuple(args, "OO", &token, &answer)) return nullptr;
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (!object->front) {
    PyErr_SetString(PyExc_RuntimeError, "the front end is not running");
    return nullptr;
  }
  void* pointer = PyLong_AsVoidPtr(token);
  if (pointer == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "not a call token");
    return nullptr;
  }
  // A pending call stays alive until it is answered: gRPC ends it (OnDone) only after Finish.
  if (!static_cast<InferCall*>(pointer)->Complete(answer)) {
    PyErr_SetString(PyExc_ValueError, "the call was not waiting for an answer");
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* FrontCounts(PyObject* self, PyObject*) {
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (!object->front) return Py_BuildValue("(lll)", 0L, 0L, 0L);
  return Py_BuildValue("(lll)", object->front->calls.load(), object->front->relayed.load(),
                       object->front->in_flight.load());
}

#ifdef EDGEWISE_FAST
// set_fast(table, limit, max_bytes): the model versions served on the fast path from now on, a
// dict {(model name, version asked for): FastModel} ("" the default version), the in-flight
// limit it keeps to and the largest request it takes (0: none). Calls being served keep the
// versions they found.
PyObject* FrontSetFast(PyObject* self, PyObject* args) {
  PyObject* table;
  long limit;
  Py_ssize_t max_bytes;
  if (!PyArg_ParseTuple(args, "O!ln", &PyDict_Type, &table, &limit, &max_bytes)) return nullptr;
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (!object->front) {
    PyErr_SetString(PyExc_RuntimeError, "the front end is not running");
    return nullptr;
  }
  auto built = std::make_shared<FastTable>();
  PyObject* key;
  PyObject* value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(table, &pos, &key, &value)) {
    const char* name;
    const char* version;
    if (!PyArg_ParseTuple(key, "ss", &name, &version)) return nullptr;
    if (!PyObject_TypeCheck(value, &kFastModelType)) {
      PyErr_SetString(PyExc_TypeError, "set_fast: every value must be a FastModel");
      return nullptr;
    }
    auto* model = reinterpret_cast<FastModelObject*>(value)->model;
    if (model == nullptr) {
      PyErr_SetString(PyExc_RuntimeError, "set_fast: a FastModel is not initialised");
      return nullptr;
    }
    (*built)[FastKey(name, version)] = *model;
  }
  object->front->fast_limit.store(limit, std::memory_order_relaxed);
  object->front->fast_max_bytes.store(max_bytes > 0 ? static_cast<size_t>(max_bytes) : 0);
  std::shared_ptr<const FastTable> done = built;
  std::atomic_store(&object->front->fast_table, done);
  Py_RETURN_NONE;
}

// set_other_in_flight(n): the calls in flight on the other front ends that share the limit.
PyObject* FrontSetOtherInFlight(PyObject* self, PyObject* arg) {
  long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (object->front) object->front->other_in_flight.store(n, std::memory_order_relaxed);
  Py_RETURN_NONE;
}

// wait_fast(timeout) -> bool: wait (the GIL released) until a call has been answered on the fast
// path since the last wait, or timeout seconds; True when one was.
PyObject* FrontWaitFast(PyObject* self, PyObject* arg) {
  double timeout = PyFloat_AsDouble(arg);
  if (timeout == -1.0 && PyErr_Occurred()) return nullptr;
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (!object->front) Py_RETURN_FALSE;
  Front* front = object->front;
  bool answered;
  Py_BEGIN_ALLOW_THREADS
  {
    std::unique_lock<std::mutex> lock(front->fast_mu);
    front->fast_cv.wait_for(lock, std::chrono::duration<double>(timeout > 0 ? timeout : 0),
                            [&] { return front->fast_dirty.load(std::memory_order_acquire); });
  }
  answered = front->fast_dirty.exchange(false, std::memory_order_acq_rel);
  Py_END_ALLOW_THREADS
  return PyBool_FromLong(answered);
}

// fast_counts() -> (calls answered on the fast path, fallbacks without a model version by reason)
PyObject* FrontFastCounts(PyObject* self, PyObject*) {
  auto* object = reinterpret_cast<FrontObject*>(self);
  PyObject* fallbacks = PyTuple_New(kReasons);
  if (fallbacks == nullptr) return nullptr;
  for (int r = 0; r < kReasons; ++r)
    PyTuple_SET_ITEM(fallbacks, r, PyLong_FromUnsignedLongLong(
                                       object->front ? object->front->fallbacks[r].load() : 0));
  return Py_BuildValue("(lN)", object->front ? object->front->fast_calls.load() : 0L, fallbacks);
}
#endif

PyMethodDef kFrontMethods[] = {
#ifdef EDGEWISE_FAST
    {"set_fast", FrontSetFast, METH_VARARGS,
     "set_fast(table, limit, max_bytes): the model versions served on the fast path, its limits"},
    {"set_other_in_flight", FrontSetOtherInFlight, METH_O,
     "set_other_in_flight(n): the other front ends' calls in flight (the shared limit)"},
    {"wait_fast", FrontWaitFast, METH_O,
     "wait_fast(timeout) -> bool: until a call was answered on the fast path, or timeout"},
    {"fast_counts", FrontFastCounts, METH_NOARGS,
     "fast_counts() -> (fast calls, fallbacks without a model version by reason)"},
#endif
    {"shutdown", FrontShutdown, METH_VARARGS,
     "shutdown(grace): stop accepting calls, wait up to grace seconds for those in flight"},
    {"counts", FrontCounts, METH_NOARGS, "counts() -> (calls, relayed, in_flight)"},
    {"complete", FrontComplete, METH_VARARGS,
     "complete(token, answer): answer a call the handler left pending"},
    {nullptr, nullptr, 0, nullptr},
};

PyMemberDef kFrontMembers[] = {
    {"port", T_INT, offsetof(FrontObject, port), READONLY, "the bound TCP port"},
    {nullptr, 0, 0, 0, nullptr},
};

PyTypeObject kFrontType = {PyVarObject_HEAD_INIT(nullptr, 0)};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_front", "gRPC C++ front end (see native_front.py)",
                       -1, nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__front() {
  kFrontType.tp_name = "edgewise.runtime.frontends.native._front.Front";
  kFrontType.tp_basicsize = sizeof(FrontObject);
  kFrontType.tp_flags = Py_TPFLAGS_DEFAULT;
  kFrontType.tp_new = PyType_GenericNew;
  kFrontType.tp_init = FrontInit;
  kFrontType.tp_dealloc = FrontDealloc;
  kFrontType.tp_methods = kFrontMethods;
  kFrontType.tp_members = kFrontMembers;
  if (PyType_Ready(&kFrontType) < 0) return nullptr;
  PyObject* module = PyModule_Create(&kModule);
  if (!module) return nullptr;
  if (PyModule_AddStringConstant(module, "SOURCE_DIGEST", EDGEWISE_FRONT_DIGEST) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
#ifdef EDGEWISE_FAST
  kFastModelType.tp_name = "edgewise.runtime.frontends.native._front.FastModel";
  kFastModelType.tp_basicsize = sizeof(FastModelObject);
  kFastModelType.tp_flags = Py_TPFLAGS_DEFAULT;
  kFastModelType.tp_new = PyType_GenericNew;
  kFastModelType.tp_init = FastModelInit;
  kFastModelType.tp_dealloc = FastModelDealloc;
  kFastModelType.tp_methods = kFastModelMethods;
  if (PyType_Ready(&kFastModelType) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  Py_INCREF(&kFastModelType);
  if (PyModule_AddObject(module, "FastModel", reinterpret_cast<PyObject*>(&kFastModelType)) < 0) {
    Py_DECREF(&kFastModelType);
    Py_DECREF(module);
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "FAST_PATH", 1) < 0) {
#else
  if (PyModule_AddIntConstant(module, "FAST_PATH", 0) < 0) {
#endif
    Py_DECREF(module);
    return nullptr;
  }
  Py_INCREF(&kFrontType);
  if (PyModule_AddObject(module, "Front", reinterpret_cast<PyObject*>(&kFrontType)) < 0) {
    Py_DECREF(&kFrontType);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
