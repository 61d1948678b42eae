// The transport floor of the native front end: a bare gRPC C++ server that answers every call
// with one canned message (a ModelInferResponse, read from a file), the least a C++ server can
// do per ModelInfer call. Built and driven by benchmarks/native_floor.py:
//
//     g++ -O2 -std=c++17 echo_server.cc -o echo_server $(pkg-config --cflags --libs grpc++)
//     echo_server PORT_FILE RESPONSE_FILE
//
// Binds 127.0.0.1 on a free port, writes the port to PORT_FILE, and serves until killed (the
// loop is echo_loop.h's, shared with native_echo_ort.cc).

#include <grpcpp/grpcpp.h>

#include <fstream>
#include <iostream>
#include <iterator>
#include <string>

#include "echo_loop.h"

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

  return echo_loop::Serve("echo_server", argv[1], answer, [] {});
}
