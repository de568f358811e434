// A thin extern "C" layer over libtorch's own collectives (c10d): a TCPStore for
// rendezvous, ProcessGroupGloo for CPU collectives and, when built with
// WEFT_WITH_NCCL (build.rs decides), ProcessGroupNCCL for GPU collectives.
//
// Rules (see shared/references/c10d.md):
// - Handles are heap-boxed c10::intrusive_ptr<...>*, freed by the *_free calls.
// - Every entry point catches every C++ exception and returns its message
//   through `err` (strdup'd; Rust frees it with weft_c10d_free_string), with a
//   non-zero return code. Nothing throws across the C boundary.
// - Tensors arrive as at::Tensor* (what tch's as_ptr gives); they are copied
//   into std::vector<at::Tensor> (refcounted aliases), so in-place results are
//   visible to Rust.
// - gloo's own types are never touched beyond creating the device: libtorch
//   bundles a newer gloo than the headers this is compiled against.

#include "guarded.hpp"

#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef WEFT_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

using StorePtr = c10::intrusive_ptr<c10d::Store>;
using BackendPtr = c10::intrusive_ptr<c10d::Backend>;

using weft_shim::fail;
using weft_shim::guarded;

std::chrono::milliseconds millis(double seconds) {
  return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000.0));
}

int wait(const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait();
  return 0;
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) void weft_c10d_free_string(char* s) { free(s); }

__attribute__((visibility("default"))) int weft_c10d_store_new(const char* host, uint16_t port,
                                                               int world_size, int is_server,
                                                               double timeout_s, void** out,
                                                               char** err) {
  return guarded(err, [&] {
    c10d::TCPStoreOptions options;
    options.port = port;
    options.isServer = is_server != 0;
    options.numWorkers = world_size;
    // Every rank announces itself; only the server then waits for the others.
    options.waitWorkers = true;
    options.timeout = millis(timeout_s);
    StorePtr store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
    *out = new StorePtr(std::move(store));
  });
}

__attribute__((visibility("default"))) void weft_c10d_store_free(void* store) {
  delete static_cast<StorePtr*>(store);
}

__attribute__((visibility("default"))) int weft_c10d_gloo_new(void* store, int rank, int world_size,
                                                              const char* hostname, double timeout_s,
                                                              void** out, char** err) {
  return guarded(err, [&] {
    auto options = c10d::ProcessGroupGloo::Options::create();
    options->timeout = millis(timeout_s);
    options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(std::string(hostname)));
    BackendPtr group = c10::make_intrusive<c10d::ProcessGroupGloo>(
        *static_cast<StorePtr*>(store), rank, world_size, options);
    *out = new BackendPtr(std::move(group));
  });
}

__attribute__((visibility("default"))) int weft_c10d_has_nccl() {
#ifdef WEFT_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// One NCCL group over every rank, bound to CUDA device `device` and connected
// eagerly, so a failed rendezvous is reported here rather than at the first
// collective, and point-to-point transfers share the one communicator.
__attribute__((visibility("default"))) int weft_c10d_nccl_new(void* store, int rank, int world_size,
                                                              int device, double timeout_s, void** out,
                                                              char** err) {
  return guarded(err, [&] {
#ifdef WEFT_WITH_NCCL
    // By default a timed-out NCCL operation is found by a watchdog thread
    // that tears the process down. Blocking waits make wait() itself time out
    // and throw, so the failure reaches Rust as an error naming the operation;
    // with no async handling the watchdog leaves the process alone. Both are
    // read when the group is created; a value the user set is kept.
    setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
    setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0", 0);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = millis(timeout_s);
    auto group = c10::make_intrusive<c10d::ProcessGroupNCCL>(*static_cast<StorePtr*>(store), rank,
                                                             world_size, options);
    at::Device bound(at::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
    group->setBoundDeviceId(bound);
    group->eagerConnectSingleDevice(bound);
    BackendPtr backend = group;
    *out = new BackendPtr(std::move(backend));
#else
    (void)store;
    (void)rank;
    (void)world_size;
    (void)device;
    (void)timeout_s;
    (void)out;
    throw std::runtime_error(
        "this weft-trainer was built without NCCL: the libtorch it links had no NCCL and CUDA "
        "headers beside it (run `WEFT_TORCH_FULL=1 scripts/setup` on the GPU machine and rebuild)");
#endif
  });
}

__attribute__((visibility("default"))) void weft_c10d_group_free(void* group) {
  delete static_cast<BackendPtr*>(group);
}

__attribute__((visibility("default"))) int weft_c10d_allreduce_sum(void* group, void* tensor, char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    wait((*static_cast<BackendPtr*>(group))->allreduce(tensors, options));
  });
}

__attribute__((visibility("default"))) int weft_c10d_send(void* group, void* tensor, int dst, int tag,
                                                          char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    wait((*static_cast<BackendPtr*>(group))->send(tensors, dst, tag));
  });
}

__attribute__((visibility("default"))) int weft_c10d_recv(void* group, void* tensor, int src, int tag,
                                                          char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    wait((*static_cast<BackendPtr*>(group))->recv(tensors, src, tag));
  });
}

__attribute__((visibility("default"))) int weft_c10d_alltoall(void* group, void* output, void* input,
                                                              const int64_t* output_splits,
                                                              const int64_t* input_splits, int parts,
                                                              char** err) {
  return guarded(err, [&] {
    std::vector<int64_t> out_splits(output_splits, output_splits + parts);
    std::vector<int64_t> in_splits(input_splits, input_splits + parts);
    at::Tensor out = *static_cast<at::Tensor*>(output);
    at::Tensor in = *static_cast<at::Tensor*>(input);
    c10d::AllToAllOptions options;
    wait((*static_cast<BackendPtr*>(group))->alltoall_base(out, in, out_splits, in_splits, options));
  });
}

__attribute__((visibility("default"))) int weft_c10d_broadcast(void* group, void* tensor, int root,
                                                               char** err) {
  return guarded(err, [&] {
    std::vector<at::Tensor> tensors{*static_cast<at::Tensor*>(tensor)};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    wait((*static_cast<BackendPtr*>(group))->broadcast(tensors, options));
  });
}

__attribute__((visibility("default"))) int weft_c10d_barrier(void* group, char** err) {
  return guarded(err, [&] {
    c10d::BarrierOptions options;
    wait((*static_cast<BackendPtr*>(group))->barrier(options));
  });
}

}  // extern "C"
