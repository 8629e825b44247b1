// The functions of cumo_kernels._cuda, as the host compiler sees them (bindings.cpp includes
// only this). Pointers are device addresses as integers, `stream` a cudaStream_t as an integer,
// `dtype` a code (0 float32, 1 float16, 2 bfloat16), `act` an activation code (cumo_hd.h). All
// tensors are contiguous row-major; Python (cumo_kernels/cuda.py) allocates and checks them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace cumo {

using u64 = uint64_t;
using i64 = int64_t;

// Throws "no CUDA device is available" where there is none; else returns the device count.
int device_count();
// Compute capability major*10+minor of `device` (throws without a device).
int device_capability(int device);
// What this build contains: archs, CUTLASS paths.
std::string build_info();

// routing.cu
void route_forward(u64 logits, i64 T, int E, int k, int B, int dtype, u64 weights, u64 ids, u64 prob_sums,
                   u64 first_counts, u64 z_sums, u64 workspace, u64 stream, int device);
void route_backward(u64 grad_weights, u64 grad_prob_sums, u64 grad_z_sums, u64 logits, u64 ids, i64 T, int E,
                    int k, int B, int dtype, u64 grad_logits, u64 stream, int device);

// permute.cu
i64 permute_workspace_bytes(i64 slots, int E);
void permute_forward(u64 x, u64 ids, i64 T, int k, i64 H, int E, int dtype, u64 x_sorted, u64 sort_idx, u64 offsets,
                     u64 workspace, u64 stream, int device);
void permute_backward(u64 grad_sorted, u64 sort_idx, i64 T, int k, i64 H, int dtype, u64 grad_x, u64 workspace,
                      u64 stream, int device);
void unpermute_forward(u64 y_sorted, u64 sort_idx, u64 weights, i64 T, int k, i64 N, int dtype, u64 out,
                       u64 workspace, u64 stream, int device);
void unpermute_backward(u64 grad_out, u64 y_sorted, u64 sort_idx, u64 weights, i64 T, int k, i64 N, int dtype,
                        u64 grad_y_sorted, u64 grad_weights, u64 workspace, u64 stream, int device);

// grouped_linear.cu
// Workspace of one grouped GEMM call (forward or backward), for the SIMT or the CUTLASS path.
i64 gemm_workspace_bytes(i64 M, i64 K, i64 N, int E, int dtype, bool use_cutlass, int device);
// cutlass_*.cu: whether a CUTLASS grouped GEMM for compute capability `cc` and `dtype` is built.
bool cutlass_supports(int cc, int dtype);
void grouped_linear_forward(u64 x, u64 weight, u64 bias, u64 offsets, i64 M, i64 K, i64 N, int E, int dtype,
                            int act, u64 y, u64 pre, u64 workspace, i64 workspace_bytes, bool use_cutlass, u64 stream,
                            int device);
void grouped_linear_backward(u64 grad_y, u64 x, u64 weight, u64 offsets, u64 pre, i64 M, i64 K, i64 N, int E,
                             int dtype, int act, u64 grad_x, u64 grad_w, u64 grad_b, u64 grad_pre, u64 workspace,
                             i64 workspace_bytes, bool use_cutlass, u64 stream, int device);

// host_tests.cu: the __host__ __device__ helpers run on host arrays (CI checks them on the CPU).
struct HostRoute {
  std::vector<float> weights, prob_sums, first_counts, z_sums;
  std::vector<int64_t> ids;
};
// The routing forward and backward of routing.cu's kernels on host arrays. path: -1 the mapping the
// device chooses for E (a thread per token for E <= 64, else a warp), 0 a thread, 1 a warp (lane by
// lane, the shuffles' butterfly order).
HostRoute host_route(const std::vector<float>& logits, int T, int E, int k, int B, int dtype, int path);
std::vector<float> host_route_backward(const std::vector<float>& logits, const std::vector<int64_t>& ids,
                                       const std::vector<float>& grad_weights,
                                       const std::vector<float>& grad_prob_sums,
                                       const std::vector<float>& grad_z_sums, int T, int E, int k, int B, int dtype,
                                       int path);
std::vector<int> host_topk(const std::vector<float>& scores, int k);
// (rank_key(score, id), key_score of it) and ranks_before, for the test of the key's order.
std::pair<u64, float> host_rank_key(float score, int id);
bool host_ranks_before(float a, int ia, float b, int ib);
// (sort_idx, offsets) of the permutation plan, computed chunk by chunk as the device does.
std::pair<std::vector<int64_t>, std::vector<int64_t>> host_permute_plan(const std::vector<int64_t>& ids, int E,
                                                                         int chunk);
// M: the grouped rows (-1: offsets.back()); rows offsets[E]:M are the dropped slots' group.
std::vector<int> host_tile_schedule(const std::vector<int64_t>& offsets, int bm, i64 M);
int host_find_tile_expert(const std::vector<int>& tiles, int tile);
std::vector<std::vector<int64_t>> host_compact_problems(const std::vector<int64_t>& offsets, i64 M);
// The CUTLASS paths' problem list: rows [m, n, k, a, b, d, lda, ldb, ldd, dummy] (cumo_hd.h).
std::vector<std::vector<int64_t>> host_problem_list(int kind, const std::vector<int64_t>& offsets, i64 K, i64 N,
                                                    i64 M);
bool host_aligned16(u64 address, i64 row_elems, int elem_bytes);
// The CUTLASS paths' problem-list layout in a workspace (cumo_hd.h's list_layout): the offsets of
// shapes, a, b, d, the three strides, zero, scratch, list, and end; and the bytes it needs.
std::vector<u64> host_list_layout(u64 base, int E, i64 width, u64 shape, u64 stride_a, u64 stride_b, u64 stride_d,
                                  u64 elem);
u64 host_list_workspace_bytes(int E, i64 width, u64 shape, u64 stride_a, u64 stride_b, u64 stride_d, u64 elem,
                              u64 after);
u64 host_problem_bytes();
float host_round_to(float v, int dtype);
std::vector<float> host_activation(const std::vector<float>& v, int act, bool derivative);
// (grad_pre, grad_b) of the backward's activation + bias-gradient pass (act_bias_grad_kernel), lane
// by lane as the device runs it; grad_y and pre are [offsets.back(), N] row-major, values already
// in the dtype. grad_pre is empty without an activation; grad_b is [E, N], rounded to the dtype.
int host_bias_lanes();  // kBiasLanes of cumo_cuda.h
std::pair<std::vector<float>, std::vector<float>> host_act_bias_grad(const std::vector<float>& grad_y,
                                                                     const std::vector<float>& pre,
                                                                     const std::vector<int64_t>& offsets, i64 N,
                                                                     int act, int dtype);

}  // namespace cumo
