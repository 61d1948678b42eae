// The compute floor served natively: echo_server.cc plus onnxruntime's C API. Like the echo
// server it answers every ModelInfer call with one canned message (edgewise's own answer to a
// one-row request), but first runs the real model once through onnxruntime's C API on one row
// like the client's (serving.py: uniform in [0, 16), 64 rows taken in turn; a tree ensemble's
// time depends on the values): the least a C++ server that runs the model can do per call (no
// decoding, no encoding). Built and driven by benchmarks/native_floor.py:
//
//     g++ -O2 -std=c++17 -I<onnxruntime headers> native_echo_ort.cc -o echo_ort \
//         $(pkg-config --cflags --libs grpc++) -ldl
//     echo_ort PORT_FILE RESPONSE_FILE LIBONNXRUNTIME MODEL_FILE INPUT_NAME FEATURES
//
// The library is the onnxruntime wheel's own (dlopen, as _ort.cc opens it); the session has
// edgewise's default options (one intra-op thread, sequential, all graph optimisations).

#include <dlfcn.h>
#include <grpcpp/grpcpp.h>

#include <cstdio>
#include <random>
#include <fstream>
#include <iostream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "echo_loop.h"
#include "onnxruntime_c_api.h"

namespace {

const OrtApi* g_api = nullptr;

void Check(OrtStatus* status, const char* what) {
  if (status == nullptr) return;
  std::cerr << "echo_ort: " << what << ": " << g_api->GetErrorMessage(status) << "\n";
  std::exit(1);
}

std::string ReadFile(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    std::cerr << "echo_ort: cannot read " << path << "\n";
    std::exit(1);
  }
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::cerr << "usage: echo_ort PORT_FILE RESPONSE_FILE LIBONNXRUNTIME MODEL_FILE INPUT FEATURES\n";
    return 2;
  }
  std::string canned = ReadFile(argv[2]);
  grpc::Slice slice(canned);
  grpc::ByteBuffer answer(&slice, 1);

  void* library = dlopen(argv[3], RTLD_NOW | RTLD_LOCAL);
  if (library == nullptr) {
    std::cerr << "echo_ort: " << dlerror() << "\n";
    return 1;
  }
  using GetApiBase = const OrtApiBase* (*)();
  auto base = reinterpret_cast<GetApiBase>(dlsym(library, "OrtGetApiBase"));
  g_api = base != nullptr ? base()->GetApi(ORT_API_VERSION) : nullptr;
  if (g_api == nullptr) {
    std::cerr << "echo_ort: no usable OrtGetApiBase in " << argv[3] << "\n";
    return 1;
  }
  OrtEnv* env = nullptr;
  Check(g_api->CreateEnv(ORT_LOGGING_LEVEL_ERROR, "echo_ort", &env), "environment");
  OrtSessionOptions* options = nullptr;
  Check(g_api->CreateSessionOptions(&options), "options");
  Check(g_api->SetIntraOpNumThreads(options, 1), "options");
  Check(g_api->SetInterOpNumThreads(options, 1), "options");
  Check(g_api->SetSessionExecutionMode(options, ORT_SEQUENTIAL), "options");
  Check(g_api->SetSessionGraphOptimizationLevel(options, ORT_ENABLE_ALL), "options");
  Check(g_api->AddSessionConfigEntry(options, "session.intra_op.allow_spinning", "0"), "options");
  std::string model = ReadFile(argv[4]);
  OrtSession* session = nullptr;
  Check(g_api->CreateSessionFromArray(env, model.data(), model.size(), options, &session), "model");
  OrtMemoryInfo* cpu = nullptr;
  Check(g_api->CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, &cpu), "memory info");
  const int64_t features = std::stoll(argv[6]);
  constexpr int kRows = 64;
  std::vector<float> rows(static_cast<size_t>(kRows * features));
  std::mt19937 random(12345);
  std::uniform_real_distribution<float> uniform(0.0f, 16.0f);
  for (float& value : rows) value = uniform(random);
  int next = 0;
  std::vector<int64_t> shape = {1, features};
  const char* input_name = argv[5];
  size_t outputs = 0;
  Check(g_api->SessionGetOutputCount(session, &outputs), "outputs");
  OrtAllocator* allocator = nullptr;
  Check(g_api->GetAllocatorWithDefaultOptions(&allocator), "allocator");
  std::vector<std::string> output_names;
  for (size_t i = 0; i < outputs; ++i) {
    char* name = nullptr;
    Check(g_api->SessionGetOutputName(session, i, allocator, &name), "output name");
    output_names.emplace_back(name);
    allocator->Free(allocator, name);
  }
  std::vector<const char*> names;
  for (const auto& name : output_names) names.push_back(name.c_str());
  auto run = [&] {
    OrtValue* input = nullptr;
    float* row = rows.data() + static_cast<size_t>(next) * static_cast<size_t>(features);
    next = (next + 1) % kRows;
    Check(g_api->CreateTensorWithDataAsOrtValue(cpu, row, static_cast<size_t>(features) * sizeof(float),
                                                shape.data(), shape.size(),
                                                ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, &input),
          "input");
    std::vector<OrtValue*> results(names.size(), nullptr);
    Check(g_api->Run(session, nullptr, &input_name, &input, 1, names.data(), names.size(),
                     results.data()),
          "run");
    g_api->ReleaseValue(input);
    for (OrtValue* value : results) g_api->ReleaseValue(value);
  };
  run();  // warm

  return echo_loop::Serve("echo_ort", argv[1], answer, run);
}
