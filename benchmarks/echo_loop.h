// The serving loop shared by echo_server.cc and native_echo_ort.cc: binds 127.0.0.1 on a free
// port, writes the port to PORT_FILE (through a rename, so a reader never sees half of it) and
// answers every call with one canned message, after ``work`` (nothing for the echo server, one
// model run for echo_ort), until killed. Public grpcpp/ API only: the generic asynchronous
// service and one completion queue polled by the calling thread, which reads each request and
// writes the answer itself (no hand-over).

#ifndef EDGEWISE_BENCHMARKS_ECHO_LOOP_H_
#define EDGEWISE_BENCHMARKS_ECHO_LOOP_H_

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>

namespace echo_loop {

// One call: asked for, its request read, answered.
struct Call {
  enum class Stage { kAsked, kRead, kAnswered };
  grpc::GenericServerContext context;
  grpc::GenericServerAsyncReaderWriter stream{&context};
  grpc::ByteBuffer request;
  Stage stage = Stage::kAsked;
};

inline void Ask(grpc::AsyncGenericService& service, grpc::ServerCompletionQueue* queue) {
  auto* call = new Call();
  service.RequestCall(&call->context, &call->stream, queue, queue, call);
}

// Serve until killed; 1 (after a line on stderr naming ``program``) when it cannot bind.
template <typename Work>
int Serve(const char* program, const char* port_file, const grpc::ByteBuffer& answer, Work work) {
  grpc::AsyncGenericService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterAsyncGenericService(&service);
  auto queue = builder.AddCompletionQueue();
  auto server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::cerr << program << ": cannot bind\n";
    return 1;
  }
  {
    std::ofstream out(std::string(port_file) + ".tmp");
    out << port;
  }
  std::rename((std::string(port_file) + ".tmp").c_str(), port_file);

  for (int i = 0; i < 8; ++i) Ask(service, queue.get());
  void* tag;
  bool ok;
  while (queue->Next(&tag, &ok)) {
    auto* call = static_cast<Call*>(tag);
    switch (call->stage) {
      case Call::Stage::kAsked:
        if (!ok) {
          delete call;
          break;
        }
        Ask(service, queue.get());
        call->stage = Call::Stage::kRead;
        call->stream.Read(&call->request, call);
        break;
      case Call::Stage::kRead:
        call->stage = Call::Stage::kAnswered;
        if (ok) {
          work();
          call->stream.WriteAndFinish(answer, grpc::WriteOptions(), grpc::Status::OK, call);
        } else {
          call->stream.Finish(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "no request"), call);
        }
        break;
      case Call::Stage::kAnswered:
        delete call;
        break;
    }
  }
  return 0;
}

}  // namespace echo_loop

#endif  // EDGEWISE_BENCHMARKS_ECHO_LOOP_H_
