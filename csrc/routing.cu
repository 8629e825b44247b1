// The routing kernels: logits [T, E] -> renormalised top-k weights, expert ids, per-sample
// balance statistics and z-loss sums (CUMO.md), and the backward to the logits.
//
// Forward, two launches, deterministic (no floating-point atomics):
//   1. one thread per token reads its E logits once and writes weights, ids, its rounded
//      probabilities, its first choice and logsumexp^2 to a float32 workspace [T*E + 2*T];
//   2. one block per (sample, column) sums a column of the workspace over the sample's tokens
//      in a fixed order: prob_sums[b, e], first_counts[b, e], z_sums[b].
#include "cumo_cuda.h"
#include "cumo_ops.h"

namespace cumo {
namespace {

constexpr int kTokenBlock = 128;
constexpr int kReduceBlock = 256;

template <typename T>
__global__ void route_token_kernel(const T* __restrict__ logits, int64_t tokens, int E, int k, int dtype,
                                   T* __restrict__ weights, int64_t* __restrict__ ids, float* __restrict__ probs_ws,
                                   float* __restrict__ first_ws, float* __restrict__ z_ws) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  float l[kMaxExperts], p[kMaxExperts], w[kMaxExperts];
  int id[kMaxExperts];
  for (int e = 0; e < E; ++e) l[e] = Elem<T>::load(logits, t * E + e);
  const float lse = route_token(l, E, k, dtype, p, id, w);
  for (int j = 0; j < k; ++j) {
    Elem<T>::store(weights, t * k + j, w[j]);
    ids[t * k + j] = id[j];
  }
  for (int e = 0; e < E; ++e) probs_ws[t * E + e] = p[e];
  first_ws[t] = static_cast<float>(id[0]);
  z_ws[t] = lse * lse;
}

// Block (b, c): c < E sums probs column c and counts first choices == c; c == E sums z.
__global__ void route_stats_kernel(const float* __restrict__ probs_ws, const float* __restrict__ first_ws,
                                   const float* __restrict__ z_ws, int64_t n, int E, float* __restrict__ prob_sums,
                                   float* __restrict__ first_counts, float* __restrict__ z_sums) {
  const int b = blockIdx.x, c = blockIdx.y;
  const int64_t row0 = static_cast<int64_t>(b) * n;
  float acc_p = 0.f, acc_f = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (c < E) {
      acc_p += probs_ws[(row0 + i) * E + c];
      acc_f += first_ws[row0 + i] == static_cast<float>(c) ? 1.f : 0.f;
    } else {
      acc_p += z_ws[row0 + i];
    }
  }
  __shared__ float sp[kReduceBlock], sf[kReduceBlock];
  sp[threadIdx.x] = acc_p;
  sf[threadIdx.x] = acc_f;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      sp[threadIdx.x] += sp[threadIdx.x + s];
      sf[threadIdx.x] += sf[threadIdx.x + s];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    if (c < E) {
      prob_sums[b * E + c] = sp[0];
      first_counts[b * E + c] = sf[0];
    } else {
      z_sums[b] = sp[0];
    }
  }
}

template <typename T>
__global__ void route_backward_kernel(const T* __restrict__ grad_weights, const float* __restrict__ grad_prob_sums,
                                      const float* __restrict__ grad_z_sums, const T* __restrict__ logits,
                                      const int64_t* __restrict__ ids, int64_t tokens, int64_t n, int E, int k,
                                      int dtype, T* __restrict__ grad_logits) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  const int64_t b = t / n;
  float l[kMaxExperts], gw[kMaxExperts], gp[kMaxExperts], dl[kMaxExperts];
  int id[kMaxExperts];
  for (int e = 0; e < E; ++e) {
    l[e] = Elem<T>::load(logits, t * E + e);
    gp[e] = grad_prob_sums[b * E + e];
  }
  for (int j = 0; j < k; ++j) {
    gw[j] = Elem<T>::load(grad_weights, t * k + j);
    id[j] = clamp_expert(ids[t * k + j], E);
  }
  route_token_backward(l, E, k, dtype, id, gw, gp, grad_z_sums[b], dl);
  for (int e = 0; e < E; ++e) Elem<T>::store(grad_logits, t * E + e, dl[e]);
}

void check_route_sizes(int64_t T, int E, int k, int B) {
  if (E < 1 || E > kMaxExperts)
    throw std::invalid_argument("cumo_kernels._cuda: route takes 1 <= E <= " + std::to_string(kMaxExperts) +
                                " experts, got " + std::to_string(E));
  if (k < 1 || k > E) throw std::invalid_argument("cumo_kernels._cuda: route needs 1 <= k <= E");
  if (B < 1 || T % B != 0) throw std::invalid_argument("cumo_kernels._cuda: route needs B >= 1 dividing T");
}

}  // namespace

void route_forward(u64 logits, i64 T, int E, int k, int B, int dtype, u64 weights, u64 ids, u64 prob_sums,
                   u64 first_counts, u64 z_sums, u64 workspace, u64 stream, int device) {
  check_dtype(dtype);
  check_route_sizes(T, E, k, B);
  DeviceGuard guard(device);
  if (T == 0) return;
  cudaStream_t s = as_stream(stream);
  float* probs_ws = ptr<float>(workspace);
  float* first_ws = probs_ws + T * E;
  float* z_ws = first_ws + T;
  dispatch_dtype(dtype, [&](auto tag) {
    using Tp = decltype(tag);
    route_token_kernel<Tp><<<grid_for(T, kTokenBlock), kTokenBlock, 0, s>>>(
        ptr<const Tp>(logits), T, E, k, dtype, ptr<Tp>(weights), ptr<int64_t>(ids), probs_ws, first_ws, z_ws);
  });
  check_launch("route_token_kernel");
  route_stats_kernel<<<dim3(B, E + 1), kReduceBlock, 0, s>>>(probs_ws, first_ws, z_ws, T / B, E,
                                                              ptr<float>(prob_sums), ptr<float>(first_counts),
                                                              ptr<float>(z_sums));
  check_launch("route_stats_kernel");
}

void route_backward(u64 grad_weights, u64 grad_prob_sums, u64 grad_z_sums, u64 logits, u64 ids, i64 T, int E,
                    int k, int B, int dtype, u64 grad_logits, u64 stream, int device) {
  check_dtype(dtype);
  check_route_sizes(T, E, k, B);
  DeviceGuard guard(device);
  if (T == 0) return;
  cudaStream_t s = as_stream(stream);
  dispatch_dtype(dtype, [&](auto tag) {
    using Tp = decltype(tag);
    route_backward_kernel<Tp><<<grid_for(T, kTokenBlock), kTokenBlock, 0, s>>>(
        ptr<const Tp>(grad_weights), ptr<const float>(grad_prob_sums), ptr<const float>(grad_z_sums),
        ptr<const Tp>(logits), ptr<const int64_t>(ids), T, T / B, E, k, dtype, ptr<Tp>(grad_logits));
  });
  check_launch("route_backward_kernel");
}

}  // namespace cumo
