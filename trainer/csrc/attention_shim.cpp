// libtorch's fused flash-attention kernel for CUDA, forward, as an extern "C"
// call: tch's generated bindings leave it out (two of its results are
// SymInts). Its backward is in tch's bindings. Same rules as c10d_shim.cpp:
// tensors arrive as at::Tensor* (tch's as_ptr), results leave as new
// at::Tensor* that Rust owns (tch's Tensor::from_ptr frees them), and every
// C++ exception comes back as a message through `err` (guarded.hpp).

#include "guarded.hpp"

#include <ATen/core/Tensor.h>
#include <ATen/ops/_scaled_dot_product_flash_attention.h>

extern "C" {

// Attention of q [B, H, L_q, E] to k, v [B, H, L_k, E] (fp16 or bf16, on a
// GPU), causal or not, at the scale 1/sqrt(E): writes the output (q's kind)
// and the log-sum-exp (fp32, [B, H, L_q]) into out[0] and out[1].
__attribute__((visibility("default"))) int weft_flash_attention_forward(const void* q,
                                                                        const void* k,
                                                                        const void* v, int causal,
                                                                        void** out, char** err) {
  return weft_shim::guarded(err, [&] {
    auto result = at::_scaled_dot_product_flash_attention(
        *static_cast<const at::Tensor*>(q), *static_cast<const at::Tensor*>(k),
        *static_cast<const at::Tensor*>(v), 0.0, causal != 0, false);
    out[0] = new at::Tensor(std::get<0>(result));
    out[1] = new at::Tensor(std::get<1>(result));
  });
}

}  // extern "C"
