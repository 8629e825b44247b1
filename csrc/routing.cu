// The routing kernels: logits [T, E] -> renormalised top-k weights, expert ids, per-sample
// balance statistics and z-loss sums (CUMO.md), and the backward to the logits.
//
// Forward, two launches, deterministic (no floating-point atomics):
//   1. each token's E logits are read once; its weights, ids, rounded probabilities, first choice
//      and logsumexp^2 go to a float32 workspace [T*E + 2*T]. E <= 64: one thread per token
//      (route_token of cumo_hd.h); 64 < E <= 256: one warp per token, E/32 logits per lane in
//      registers, reductions by warp shuffles in a fixed order (cumo_hd.h, "a warp per token");
//   2. one block per (sample, column) sums a column of the workspace over the sample's tokens
//      in a fixed order: prob_sums[b, e], first_counts[b, e], z_sums[b].
// The backward maps tokens to threads or warps as the forward does.
//
// Why two mappings: a thread per token keeps the E <= 64 kernels (CuMo's E = 4 above all) as they
// were, bit for bit; at E = 128..256 a thread would hold up to 1 KiB of scores per array in local
// memory, read its row with loads 2*E bytes apart across the warp, and at T = 4096 tokens fill 32
// of the GPU's SMs with one warp each. A warp per token reads its row coalesced, keeps <= 8 scores
// per lane in registers (no local memory: ptxas, benchmarks/NOTES.md) and launches T warps.
#include "cumo_cuda.h"
#include "cumo_ops.h"

namespace cumo {
namespace {

constexpr int kTokenBlock = 128;
constexpr int kWarpBlock = 128;  // the warp path: 4 tokens per block
static_assert(kLaneSlots * kRouteLanes == kMaxExperts && kThreadExperts <= kMaxExperts,
              "a warp's lanes hold every expert up to kMaxExperts");
static_assert(kWarpBlock % kRouteLanes == 0, "whole warps per block: the shuffles see all 32 lanes");
constexpr int kReduceBlock = 256;

// Warp reductions in the order cumo_hd.h's warp path states (butterfly over offsets 16..1): every
// lane ends with the same value.
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = kRouteLanes / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {  // butterfly_sum's order
#pragma unroll
  for (int o = kRouteLanes / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ uint64_t warp_max_key(uint64_t v) {
#pragma unroll
  for (int o = kRouteLanes / 2; o > 0; o /= 2) {
    const uint64_t w = __shfl_xor_sync(0xffffffffu, static_cast<unsigned long long>(v), o);
    v = w > v ? w : v;
  }
  return v;
}

// The float32 probability of expert e of the token, from the lane holding it (all lanes call this
// with the same e).
__device__ __forceinline__ float warp_prob(const float (&p)[kLaneSlots], int e) {
  return __shfl_sync(0xffffffffu, lane_slot(p, e / kRouteLanes), e % kRouteLanes);
}

template <typename T>
__global__ void route_token_kernel(const T* __restrict__ logits, int64_t tokens, int E, int k, int dtype,
                                   T* __restrict__ weights, int64_t* __restrict__ ids, float* __restrict__ probs_ws,
                                   float* __restrict__ first_ws, float* __restrict__ z_ws) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (t >= tokens) return;
  float l[kThreadExperts], p[kThreadExperts], w[kThreadExperts];  // E <= kThreadExperts
  int id[kThreadExperts];
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

// The forward of route_token_kernel with a warp per token (64 < E <= kMaxExperts). The warp kernels
// have no __launch_bounds__(128): with it ptxas spilled 4 bytes in the backward at the same 56
// registers; without, none (ptxas -v, benchmarks/NOTES.md).
template <typename T>
__global__ void route_warp_kernel(const T* __restrict__ logits, int64_t tokens, int E, int k, int dtype,
                                  T* __restrict__ weights, int64_t* __restrict__ ids, float* __restrict__ probs_ws,
                                  float* __restrict__ first_ws, float* __restrict__ z_ws) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(kWarpBlock / kRouteLanes) + threadIdx.x / kRouteLanes;
  const int lane = threadIdx.x % kRouteLanes;
  if (t >= tokens) return;  // the whole warp: the shuffles below see all 32 lanes
  const int n = lane_experts(E, lane);
  float l[kLaneSlots], p[kLaneSlots];
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i) l[i] = i < n ? Elem<T>::load(logits, t * E + lane + kRouteLanes * i) : 0.f;
  const float m = warp_max(lane_max(l, n));
  const float s = warp_sum(lane_exp(l, n, m, p));
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i)
    if (i < n) {
      p[i] = round_to(p[i] / s, dtype);
      probs_ws[t * E + lane + kRouteLanes * i] = p[i];
    }
  // Choice j = jj*32 + r: the best ranked after choice j-1 (each lane's largest key below it, then
  // the largest of the warp); lane r keeps it in win[jj].
  uint64_t key[kLaneSlots], win[kLaneSlots], after = ~uint64_t(0);
  lane_keys(p, n, lane, key);
  float sel = 0.f;  // the chosen probabilities' sum, in choice order
#pragma unroll
  for (int jj = 0; jj < kLaneSlots; ++jj) {
    win[jj] = 0;
    for (int r = 0; r < kRouteLanes && jj * kRouteLanes + r < k; ++r) {
      after = warp_max_key(lane_best_below(key, after));
      if (lane == r) win[jj] = after;
      sel += key_score(after);
    }
  }
  sel = round_to(sel, dtype);
#pragma unroll
  for (int jj = 0; jj < kLaneSlots; ++jj) {
    const int j = jj * kRouteLanes + lane;
    if (j < k) {
      Elem<T>::store(weights, t * k + j, renormalised(key_score(win[jj]), sel, dtype));
      ids[t * k + j] = key_id(win[jj]);
    }
  }
  if (lane == 0) {
    const float lse = m + logf(s);
    first_ws[t] = static_cast<float>(key_id(win[0]));
    z_ws[t] = lse * lse;
  }
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
  float l[kThreadExperts], gw[kThreadExperts], gp[kThreadExperts], dl[kThreadExperts];  // E <= kThreadExperts
  int id[kThreadExperts];
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

// The backward of route_backward_kernel with a warp per token (64 < E <= kMaxExperts).
template <typename T>
__global__ void route_backward_warp_kernel(const T* __restrict__ grad_weights,
                                           const float* __restrict__ grad_prob_sums,
                                           const float* __restrict__ grad_z_sums, const T* __restrict__ logits,
                                           const int64_t* __restrict__ ids, int64_t tokens, int64_t n_per_sample,
                                           int E, int k, int dtype, T* __restrict__ grad_logits) {
  const int64_t t = blockIdx.x * static_cast<int64_t>(kWarpBlock / kRouteLanes) + threadIdx.x / kRouteLanes;
  const int lane = threadIdx.x % kRouteLanes;
  if (t >= tokens) return;  // the whole warp
  const int64_t b = t / n_per_sample;
  const int n = lane_experts(E, lane);
  float l[kLaneSlots], p[kLaneSlots], dl[kLaneSlots];
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i) {
    l[i] = i < n ? Elem<T>::load(logits, t * E + lane + kRouteLanes * i) : 0.f;
    dl[i] = i < n ? grad_prob_sums[b * E + lane + kRouteLanes * i] : 0.f;  // dprobs
  }
  const float m = warp_max(lane_max(l, n));
  const float s = warp_sum(lane_exp(l, n, m, p));
  const float lse = m + logf(s);
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i) p[i] = p[i] / s;
  // route_token_backward's sums over the choices, in choice order, on every lane.
  const T* gw = grad_weights + t * k;
  const int64_t* id = ids + t * k;
  float sel_sum = 0.f;
  for (int j = 0; j < k; ++j) sel_sum += round_to(warp_prob(p, clamp_expert(id[j], E)), dtype);
  sel_sum = round_to(sel_sum, dtype);
  float dot = 0.f;
  for (int j = 0; j < k; ++j)
    dot += Elem<T>::load(gw, j) * (round_to(warp_prob(p, clamp_expert(id[j], E)), dtype) / sel_sum);
  for (int j = 0; j < k; ++j) {
    const int e = clamp_expert(id[j], E);
    const float add = (Elem<T>::load(gw, j) - dot) / sel_sum;
#pragma unroll
    for (int i = 0; i < kLaneSlots; ++i)
      if (lane + kRouteLanes * i == e) dl[i] += add;
  }
  const float pd = warp_sum(lane_dot(dl, p, n));
  const float gz = grad_z_sums[b];
#pragma unroll
  for (int i = 0; i < kLaneSlots; ++i)
    if (i < n) Elem<T>::store(grad_logits, t * E + lane + kRouteLanes * i, grad_logit(p[i], dl[i], pd, lse, gz));
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
    if (E <= kThreadExperts)
      route_token_kernel<Tp><<<grid_for(T, kTokenBlock), kTokenBlock, 0, s>>>(
          ptr<const Tp>(logits), T, E, k, dtype, ptr<Tp>(weights), ptr<int64_t>(ids), probs_ws, first_ws, z_ws);
    else
      route_warp_kernel<Tp><<<grid_for(T, kWarpBlock / kRouteLanes), kWarpBlock, 0, s>>>(
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
    if (E <= kThreadExperts)
      route_backward_kernel<Tp><<<grid_for(T, kTokenBlock), kTokenBlock, 0, s>>>(
          ptr<const Tp>(grad_weights), ptr<const float>(grad_prob_sums), ptr<const float>(grad_z_sums),
          ptr<const Tp>(logits), ptr<const int64_t>(ids), T, T / B, E, k, dtype, ptr<Tp>(grad_logits));
    else
      route_backward_warp_kernel<Tp><<<grid_for(T, kWarpBlock / kRouteLanes), kWarpBlock, 0, s>>>(
          ptr<const Tp>(grad_weights), ptr<const float>(grad_prob_sums), ptr<const float>(grad_z_sums),
          ptr<const Tp>(logits), ptr<const int64_t>(ids), T, T / B, E, k, dtype, ptr<Tp>(grad_logits));
  });
  check_launch("route_backward_kernel");
}

}  // namespace cumo
