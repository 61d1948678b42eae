// The transport floor of the native front end: a bare gRPC C++ server that answers every call
// with one canned message (a ModelInferResponse, read from a file), the least a C++ server can
// do per ModelInfer call. Built and driven by benchmarks/native_floor.py:
//
//     g++ -O2 -std=c++17 echo_server.cc -o echo_server $(pkg-config --cflags --libs grpc++)
//     echo_server PORT_FILE RESPONSE_FILE
//
// Binds 127.0.0.1 on a free port, writes the port to PORT_FILE, and serves until killed. Public
// grpcpp/ API only: the generic asynchronous service and one completion queue polled by this
// program's only thread, which reads each request and writes the answer itself (no hand-over).

#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/grpcpp.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>

namespace {

// One call: asked for, its request read, answered.
struct Call {
  enum class Stage { kAsked, kRead, kAnswered };
  grpc::GenericServerContext context;
  grpc::GenericServerAsyncReaderWriter stream{&context};
  grpc::ByteBuffer request;
  Stage stage = Stage::kAsked;
};

void Ask(grpc::AsyncGenericService& service, grpc::ServerCompletionQueue* queue) {
  auto* call = new Call();
  service.RequestCall(&call->context, &call->stream, queue, queue, call);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: echo_server PORT_FILE RESPONSE_FILE\n";
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  if (!in) {
    std::cerr << "echo_server: cannot read " << argv[2] << "\n";
    return 1;
  }
  std::string canned((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  grpc::Slice slice(canned);
  grpc::ByteBuffer answer(&slice, 1);

  grpc::AsyncGenericService service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterAsyncGenericService(&service);
  auto queue = builder.AddCompletionQueue();
  auto server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::cerr << "echo_server: cannot bind\n";
    return 1;
  }
  {
    std::ofstream out(std::string(argv[1]) + ".tmp");
    out << port;
  }
  std::rename((std::string(argv[1]) + ".tmp").c_str(), argv[1]);

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
