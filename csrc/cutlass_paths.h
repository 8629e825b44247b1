// The CUTLASS tensor-core paths of the grouped GEMM (cutlass_grouped.cu). Each takes the
// problem list from the device (built there from the offsets, empty experts removed), so nothing
// synchronises with the host. cuda.py chooses them only for float16/bfloat16 operands whose
// rows are 16-byte aligned, on a device whose architecture this build contains.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <string>

namespace cumo {

// Bytes of device workspace the CUTLASS paths need (problem list, pointer arrays, strides).
int64_t cutlass_workspace_bytes(int64_t M, int E);
// Which CUTLASS paths this build holds, e.g. "sm90:bf16,fp16 sm80:bf16,fp16" (or "none").
std::string cutlass_build_info();
// Whether a CUTLASS path for compute capability `cc` (major*10+minor) and `dtype` is built.
bool cutlass_supports(int cc, int dtype);

void cutlass_grouped_forward(uint64_t x, uint64_t weight, uint64_t bias, uint64_t offsets, int64_t M, int64_t K,
                             int64_t N, int E, int dtype, int act, uint64_t y, uint64_t pre, uint64_t workspace,
                             cudaStream_t stream, int device);
void cutlass_grouped_backward(uint64_t g, uint64_t x, uint64_t weight, uint64_t offsets, int64_t M, int64_t K,
                              int64_t N, int E, int dtype, uint64_t grad_x, uint64_t grad_w, uint64_t workspace,
                              cudaStream_t stream, int device);

}  // namespace cumo
