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
