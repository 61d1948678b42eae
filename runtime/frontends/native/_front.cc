// The native front end: gRPC's C++ server on the public port (see native_front.py).
//
// ModelInfer is registered with gRPC as a unary method taking and giving raw bytes: its request
// comes in with the call, and the call is queued for the front end's own threads, which hand the
// bytes to one Python callable (the GIL taken only for that call); its answer goes back without
// any Python gRPC machinery, at once or later (Front.complete, for a call waiting in a batch
// queue). Every
// other call (health, reflection, metadata, the repository and monitoring services) is relayed
// byte for byte, metadata, deadline, status and trailers included, to the process's grpc.aio
// server on a private Unix socket, so that those services are served by the same Python code
// as without this front end.
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
#include <grpcpp/impl/codegen/server_callback_handlers.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/security/tls_certificate_provider.h>
#include <grpcpp/security/tls_credentials_options.h>

#include <structmember.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <iterator>
#include <thread>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

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

bool Forwardable(const std::string& key) {
  // What gRPC itself sets on each hop is not copied: pseudo-headers, the transport's own
  // headers and grpc-* (the deadline travels as the relayed call's deadline).
  if (key.empty() || key[0] == ':') return false;
  if (key.rfind("grpc-", 0) == 0) return false;
  return key != "content-type" && key != "te" && key != "user-agent";
}

struct Front;

// One ModelInfer call: its request came in with the call; one of the front end's own threads
// answers it through the Python handler (Answer), or Front.complete does later (Complete).
class InferCall final : public grpc::ServerUnaryReactor {
 public:
  InferCall(Front* front, grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
            grpc::ByteBuffer* response);
  void OnCancel() override {}
  void OnDone() override;
  // OnDone only uncounts the call and deletes it, and OnCancel does nothing: gRPC may run them
  // on the thread that ends the call instead of waking its executor for them.
  bool InternalInlineable() override { return true; }

  // The fast path: on one of the front end's own threads.
  void Answer();
  // A pending call's answer, from Front.complete (the GIL held). Returns false when the call
  // was not pending (a second completion): nothing is done then.
  bool Complete(PyObject* answer);

 private:
  // Writes the answer or the status; unlocks `lock` first (Finish may end the call, running
  // OnDone and deleting this object before it returns).
  void Deliver(Parsed& answer, std::unique_lock<std::mutex>& lock);
  void Uncount();  // the call no longer counts as in flight

  Front* front_;
  grpc::CallbackServerContext* context_;
  const grpc::ByteBuffer* request_;
  grpc::ByteBuffer* response_;
  std::atomic<bool> counted_{true};
  std::mutex mu_;
  bool pending_ = false;
  bool answered_ = false;
  // An answer that came through Front.complete before Answer() saw the handler's kPending (the
  // event loop can run the batch before this thread gets the lock back).
  std::optional<Parsed> early_;
};

// Any other call on the public port: relayed to the Python server.
class Call final : public grpc::ServerGenericBidiReactor {
 public:
  Call(Front* front, grpc::GenericCallbackServerContext* context);
  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

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
  void StartRelay();                    // relay the call to the Python server
  void UpstreamReadDone(bool ok);
  void UpstreamWriteDone(bool ok);
  void UpstreamDone(const grpc::Status& status);
  void ReleaseWriteHold();   // mu_ held
  void ReleaseReadHold();    // mu_ held
  void FinishLocked(const grpc::Status& status);  // mu_ held

  Front* front_;
  grpc::GenericCallbackServerContext* context_;
  std::recursive_mutex mu_;
  grpc::ByteBuffer from_client_, from_upstream_;
  std::unique_ptr<grpc::ClientContext> upstream_context_;
  Upstream upstream_{this};
  bool write_hold_ = false, read_hold_ = false;
  bool writing_to_client_ = false;
  bool finished_ = false;
  bool finish_pending_ = false;
  grpc::Status pending_status_;
  bool server_done_ = false, upstream_done_ = true;
};

struct Front {
  PyObject* handler = nullptr;  // handle(body, authorization, remaining, in_flight, token)
  PyObject* after = nullptr;    // after(): work deferred until the answer is on its way
  std::string fast_method;      // outlives the server: gRPC keeps a pointer to it
  std::unique_ptr<grpc::GenericStub> upstream;
  std::unique_ptr<grpc::Service> infer_service;           // outlive the server
  std::unique_ptr<grpc::CallbackGenericService> service;
  std::unique_ptr<grpc::Server> server;
  std::atomic<long> in_flight{0};
  std::atomic<long> calls{0};
  std::atomic<long> relayed{0};

  // The threads that run the Python handler. gRPC's callback threads only queue a call for them
  // and never wait for the GIL themselves: they also accept connections and move every other
  // call, health checks included. Cheap calls go to one thread that answers them back to back:
  // more threads would only pass the GIL between them, each pass a thread wake-up. The others
  // take the calls whose onnxruntime runs (which release the GIL) are worth overlapping:
  // requests over small_max_bytes, and every request while the handler has recently taken
  // longer than kSideBySideMicros a call (a moving average over all calls).
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
};

// ModelInfer, registered as a unary method on raw bytes (gRPC does not parse them).
class InferService final : public grpc::Service {
 public:
  explicit InferService(Front* front) {
    AddMethod(new grpc::internal::RpcServiceMethod(front->fast_method.c_str(),
                                                   grpc::internal::RpcMethod::NORMAL_RPC, nullptr));
    MarkMethodRawCallback(
        0, new grpc::internal::CallbackUnaryHandler<grpc::ByteBuffer, grpc::ByteBuffer>(
               [front](grpc::CallbackServerContext* context, const grpc::ByteBuffer* request,
                       grpc::ByteBuffer* response) -> grpc::ServerUnaryReactor* {
                 return new InferCall(front, context, request, response);
               }));
  }
};

// Every method not registered: relayed.
class Service final : public grpc::CallbackGenericService {
 public:
  explicit Service(Front* front) : front_(front) {}
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* context) override {
    return new Call(front_, context);
  }

 private:
  Front* front_;
};

InferCall::InferCall(Front* front, grpc::CallbackServerContext* context,
                     const grpc::ByteBuffer* request, grpc::ByteBuffer* response)
    : front_(front), context_(context), request_(request), response_(response) {
  front_->calls.fetch_add(1, std::memory_order_relaxed);
  front_->in_flight.fetch_add(1, std::memory_order_relaxed);
  // Stays alive until answered: gRPC ends a call (OnDone) only after Finish.
  front_->Enqueue(this, request->Length());
}

void InferCall::OnDone() {
  Uncount();
  delete this;
}

void InferCall::Uncount() {
  if (counted_.exchange(false, std::memory_order_relaxed)) {
    front_->in_flight.fetch_sub(1, std::memory_order_relaxed);
  }
}

void InferCall::Answer() {
  std::vector<grpc::Slice> slices;
  bool readable = request_->Dump(&slices).ok();
  std::string authorization;
  bool has_authorization = false;
  for (const auto& [key, value] : context_->client_metadata()) {
    if (key == "authorization") {
      authorization.assign(value.data(), value.size());
      has_authorization = true;
      break;
    }
  }
  double remaining = -1.0;  // no deadline
  auto deadline = context_->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) {
    remaining = std::chrono::duration<double>(deadline - std::chrono::system_clock::now()).count();
    if (remaining < 0) remaining = 0;
  }
  long in_flight = front_->in_flight.load(std::memory_order_relaxed);

  Parsed answer;
  {
    Gil gil;
    PyObject* arg_body = readable ? ToBytes(slices) : PyBytes_FromStringAndSize("", 0);
    PyObject* arg_auth = has_authorization
        ? PyUnicode_DecodeLatin1(authorization.data(), static_cast<Py_ssize_t>(authorization.size()), nullptr)
        : (Py_INCREF(Py_None), Py_None);
    PyObject* arg_remaining = remaining < 0 ? (Py_INCREF(Py_None), Py_None) : PyFloat_FromDouble(remaining);
    PyObject* arg_in_flight = PyLong_FromLong(in_flight);
    PyObject* arg_token = PyLong_FromVoidPtr(this);
    PyObject* result = nullptr;
    if (arg_body && arg_auth && arg_remaining && arg_in_flight && arg_token) {
      PyObject* args[] = {arg_body, arg_auth, arg_remaining, arg_in_flight, arg_token};
      auto started = std::chrono::steady_clock::now();
      result = PyObject_Vectorcall(front_->handler, args, 5, nullptr);
      front_->Timed(static_cast<long>(std::chrono::duration_cast<std::chrono::microseconds>(
                                          std::chrono::steady_clock::now() - started)
                                          .count()));
    }
    Py_XDECREF(arg_body);
    Py_XDECREF(arg_auth);
    Py_XDECREF(arg_remaining);
    Py_XDECREF(arg_in_flight);
    Py_XDECREF(arg_token);
    if (PyErr_Occurred()) PyErr_Print();  // a bug in the handler: logged, the call gets INTERNAL
    answer = ParseAnswer(result);
    Py_XDECREF(result);

    // Answered with the GIL still held (Finish never waits), then the deferred work in the same
    // hold: taking the GIL again for it would cost another hand-over when other threads wait.
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
    // From here on `this` may have been deleted (OnDone on another thread).
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
  for (const auto& [key, value] : answer.trailers) context_->AddTrailingMetadata(key, value);
  grpc::Status status;
  if (answer.code == 0 && answer.has_reply) {
    *response_ = grpc::ByteBuffer(&answer.reply, 1);
  } else {
    int code = answer.code;
    if (code <= 0 || code > 16) code = static_cast<int>(grpc::StatusCode::INTERNAL);
    status = grpc::Status(static_cast<grpc::StatusCode>(code), answer.message);
  }
  lock.unlock();
  Finish(status);
}

Call::Call(Front* front, grpc::GenericCallbackServerContext* context)
    : front_(front), context_(context) {
  front_->calls.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard<std::recursive_mutex> lock(mu_);
  StartRelay();
}

void Call::OnReadDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (upstream_done_ || !write_hold_) return;  // nothing more goes upstream
  if (ok) {
    upstream_.StartWrite(&from_client_);
  } else {  // the client has half-closed
    upstream_.StartWritesDone();
    ReleaseWriteHold();
  }
}

void Call::OnWriteDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
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

void Call::OnCancel() {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (upstream_context_) upstream_context_->TryCancel();
}

void Call::OnDone() {
  bool last;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    server_done_ = true;
    last = upstream_done_;
  }
  if (last) delete this;  // both halves are done: nothing can call into this object again
}

void Call::StartRelay() {
  front_->relayed.fetch_add(1, std::memory_order_relaxed);
  upstream_context_ = std::make_unique<grpc::ClientContext>();
  auto deadline = context_->deadline();
  if (deadline != std::chrono::system_clock::time_point::max()) upstream_context_->set_deadline(deadline);
  for (const auto& [key, value] : context_->client_metadata()) {
    std::string name(key.data(), key.size());
    if (Forwardable(name)) upstream_context_->AddMetadata(name, std::string(value.data(), value.size()));
  }
  upstream_done_ = false;
  write_hold_ = read_hold_ = true;
  front_->upstream->PrepareBidiStreamingCall(upstream_context_.get(), context_->method(),
                                             grpc::StubOptions(), &upstream_);
  upstream_.AddMultipleHolds(2);  // one for each direction we still drive from the server side
  upstream_.StartRead(&from_upstream_);
  StartRead(&from_client_);
  upstream_.StartCall();
}

void Call::UpstreamWriteDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
  if (!ok) {  // the relayed call has ended; its status will tell
    ReleaseWriteHold();
    return;
  }
  if (!finished_) StartRead(&from_client_);
}

void Call::UpstreamReadDone(bool ok) {
  std::lock_guard<std::recursive_mutex> lock(mu_);
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
  StartWrite(&from_upstream_);
}

void Call::UpstreamDone(const grpc::Status& status) {
  bool last;
  {
    std::lock_guard<std::recursive_mutex> lock(mu_);
    upstream_done_ = true;
    last = server_done_;
    if (!finished_) {
      for (const auto& [key, value] : upstream_context_->GetServerTrailingMetadata()) {
        context_->AddTrailingMetadata(std::string(key.data(), key.size()),
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
  if (last) delete this;
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
  Finish(status);
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

// ---- the Python object -----------------------------------------------------------------------

struct FrontObject {
  PyObject_HEAD
  Front* front;
  int port;
};

void FrontDealloc(PyObject* self) {
  auto* object = reinterpret_cast<FrontObject*>(self);
  if (object->front) {
    Py_BEGIN_ALLOW_THREADS
    if (object->front->server) {
      object->front->server->Shutdown(std::chrono::system_clock::now());
      object->front->server->Wait();
    }
    object->front->StopWorkers();
    Py_END_ALLOW_THREADS
    Py_XDECREF(object->front->handler);
    Py_XDECREF(object->front->after);
    delete object->front;
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

  front->infer_service = std::make_unique<InferService>(front.get());
  front->service = std::make_unique<Service>(front.get());
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(address, PortCredentials(tls), &port);
  builder.SetMaxReceiveMessageSize(max_message_bytes);
  builder.SetMaxSendMessageSize(max_message_bytes);
  builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, reuse_port ? 1 : 0);
  builder.RegisterService(front->infer_service.get());
  builder.RegisterCallbackGenericService(front->service.get());
  Py_BEGIN_ALLOW_THREADS
  front->server = builder.BuildAndStart();
  Py_END_ALLOW_THREADS
  if (!front->server || port == 0) {
    PyErr_Format(PyExc_OSError, "cannot bind %s", address);
    return -1;
  }
  front->StartWorkers(handlers);
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
  Py_BEGIN_ALLOW_THREADS
  object->front->server->Shutdown(deadline);  // stops accepting; waits for calls, then cancels
  object->front->server->Wait();
  object->front->StopWorkers();  // every call has ended: the queue is empty
  Py_END_ALLOW_THREADS
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

PyMethodDef kFrontMethods[] = {
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
  Py_INCREF(&kFrontType);
  if (PyModule_AddObject(module, "Front", reinterpret_cast<PyObject*>(&kFrontType)) < 0) {
    Py_DECREF(&kFrontType);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
