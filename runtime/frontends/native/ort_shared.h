// One onnxruntime session shared by the C API module (_ort.cc, which made it from the bytes the
// Python side validated) and the native front end (_front.cc, which runs it on its fast path
// without the GIL). Reference counted: whoever drops the last reference releases the session,
// so a model version swapped out under load keeps its session until its last request is done.
// Both modules are built by build.py with the same compiler; the layout below is their contract.
#ifndef EDGEWISE_ORT_SHARED_H_
#define EDGEWISE_ORT_SHARED_H_

#include <atomic>

#include "onnxruntime_c_api.h"

// The capsule name under which _ort's Session.shared hands one of these out (a borrowed
// pointer: the taker adds its own reference with Ref and drops it with release).
#define EDGEWISE_ORT_SHARED_CAPSULE "edgewise.ort.shared"

struct EdgewiseOrtShared {
  std::atomic<long> refs;
  const OrtApi* api;
  OrtSession* session;
  OrtMemoryInfo* cpu;
  void (*release)(EdgewiseOrtShared*);  // drops one reference; the last releases the session
  void Ref() { refs.fetch_add(1, std::memory_order_relaxed); }
};

#endif  // EDGEWISE_ORT_SHARED_H_
