// One grouped GEMM launch as the CUTLASS paths take it (plain data, no CUTLASS types), so that
// the dispatcher (cutlass_grouped.cu, built for every arch) never includes an arch's kernels.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "cumo_hd.h"  // GemmKind, GroupedProblem, build_problem_list

namespace cumo {

struct GroupedCall {
  int kind;     // GemmKind
  int64_t M;    // grouped rows (rows offsets[E]:M belong to no expert: no problem covers them)
  int64_t K;    // x's columns (the layer's input width)
  int64_t N;    // the layer's output width
  int E;        // experts (the group count, empty ones included)
  uint64_t a;   // kForward: x;  kGradX: g;  kGradW: g
  uint64_t b;   // kForward: W;  kGradX: W;  kGradW: x
  uint64_t d;   // kForward: y;  kGradX: grad_x;  kGradW: grad_w
  uint64_t offsets;  // [E+1] int64 row offsets on the device
  uint64_t workspace;
  uint64_t workspace_bytes;
  cudaStream_t stream;
  int device;
};

namespace sm90 {
void run_bf16(const GroupedCall& c);
void run_fp16(const GroupedCall& c);
size_t workspace_bf16(int E, int64_t K, int64_t N, int device);
size_t workspace_fp16(int E, int64_t K, int64_t N, int device);
}  // namespace sm90

namespace sm80 {
void run_bf16(const GroupedCall& c);
void run_fp16(const GroupedCall& c);
size_t workspace_bf16(int E, int64_t K, int64_t N);
size_t workspace_fp16(int E, int64_t K, int64_t N);
}  // namespace sm80

}  // namespace cumo
