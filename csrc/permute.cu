// Grouping token rows by expert (histogram, offsets, stable sort order, gather) and the weighted
// combine back to token order, with their backward kernels. Deterministic: integer counts per
// chunk, sums in a fixed order, no floating-point atomics; nothing is read back by the host.
#include "cumo_cuda.h"
#include "cumo_ops.h"

namespace cumo {
namespace {

constexpr int kChunk = 256;  // slots per chunk of the sort plan (= threads per block)
constexpr int kRowBlock = 256;

int64_t num_chunks(int64_t slots) { return (slots + kChunk - 1) / kChunk; }

// 1. counts[c*(E+1) + b] = slots of chunk c in bin b (expert_bin: 0..E-1, E for dropped slots).
__global__ void chunk_count_kernel(const int64_t* __restrict__ ids, int64_t slots, int E, int* __restrict__ counts) {
  extern __shared__ int hist[];
  for (int b = threadIdx.x; b <= E; b += blockDim.x) hist[b] = 0;
  __syncthreads();
  const int64_t i = blockIdx.x * static_cast<int64_t>(kChunk) + threadIdx.x;
  if (i < slots) atomicAdd(&hist[expert_bin(ids[i], E)], 1);  // integer: order-independent
  __syncthreads();
  for (int b = threadIdx.x; b <= E; b += blockDim.x) counts[blockIdx.x * (E + 1) + b] = hist[b];
}

// 2. offsets [E+1] and base [C*(E+1)], one block.
__global__ void plan_kernel(const int* __restrict__ counts, int chunks, int E, int64_t* __restrict__ offsets,
                            int64_t* __restrict__ base) {
  if (threadIdx.x == 0) plan_offsets(counts, chunks, E, offsets);
  __syncthreads();
  for (int b = threadIdx.x; b <= E; b += blockDim.x) plan_bases(counts, chunks, E, b, offsets[b], base);
}

// 3. sort_idx[base[c, b] + rank] = slot.
__global__ void scatter_kernel(const int64_t* __restrict__ ids, int64_t slots, int E, const int64_t* __restrict__ base,
                               int64_t* __restrict__ sort_idx) {
  __shared__ int chunk_ids[kChunk];
  const int64_t i = blockIdx.x * static_cast<int64_t>(kChunk) + threadIdx.x;
  chunk_ids[threadIdx.x] = i < slots ? expert_bin(ids[i], E) : -1;
  __syncthreads();
  if (i >= slots) return;
  const int b = chunk_ids[threadIdx.x];
  sort_idx[base[blockIdx.x * (E + 1) + b] + rank_in_chunk(chunk_ids, threadIdx.x)] = i;
}

// 4. x_sorted[r] = x[sort_idx[r] / k]: one block per grouped row.
template <typename T>
__global__ void gather_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ sort_idx, int k, int64_t H,
                                   T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t src = token_of_slot(sort_idx[r], k);
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) out[r * H + h] = x[src * H + h];
}

__global__ void inverse_kernel(const int64_t* __restrict__ sort_idx, int64_t slots, int64_t* __restrict__ inv) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i < slots) {
    const int64_t s = sort_idx[i];
    if (s >= 0 && s < slots) inv[s] = i;
  }
}

// grad_x[t] = sum_j grad_sorted[inv[t*k + j]], float32 accumulation, one rounding.
template <typename T>
__global__ void sum_slots_kernel(const T* __restrict__ rows, const int64_t* __restrict__ inv, int k, int64_t H,
                                 const T* __restrict__ weights, T* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int64_t h = threadIdx.x; h < H; h += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < k; ++j) {
      const float v = Elem<T>::load(rows, inv[t * k + j] * H + h);
      acc += weights ? Elem<T>::load(weights, t * k + j) * v : v;
    }
    Elem<T>::store(out, t * H + h, acc);
  }
}

// grad_y_sorted[r] = grad_out[token of r] * weights[slot of r].
template <typename T>
__global__ void scale_rows_kernel(const T* __restrict__ grad_out, const int64_t* __restrict__ sort_idx,
                                  const T* __restrict__ weights, int k, int64_t N, T* __restrict__ out) {
  const int64_t r = blockIdx.x;
  const int64_t slot = min(max(sort_idx[r], int64_t(0)), static_cast<int64_t>(gridDim.x) - 1);  // in range
  const int64_t t = token_of_slot(slot, k);
  const float w = Elem<T>::load(weights, slot);
  for (int64_t h = threadIdx.x; h < N; h += blockDim.x)
    Elem<T>::store(out, r * N + h, Elem<T>::load(grad_out, t * N + h) * w);
}

// grad_weights[s] = <y_sorted[inv[s]], grad_out[s / k]>: one warp per slot.
template <typename T>
__global__ void slot_dot_kernel(const T* __restrict__ y_sorted, const T* __restrict__ grad_out,
                                const int64_t* __restrict__ inv, int64_t slots, int k, int64_t N,
                                T* __restrict__ grad_w) {
  const int64_t s = blockIdx.x * static_cast<int64_t>(blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (s >= slots) return;
  const int64_t r = inv[s], t = token_of_slot(s, k);
  float acc = 0.f;
  for (int64_t h = lane; h < N; h += 32) acc += Elem<T>::load(y_sorted, r * N + h) * Elem<T>::load(grad_out, t * N + h);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) Elem<T>::store(grad_w, s, acc);
}

// inv is zeroed first: a sort_idx that is not a permutation of the slots (not from permute)
// leaves some entries unwritten, and they must still index a row that exists.
void launch_inverse(const int64_t* sort_idx, int64_t slots, int64_t* inv, cudaStream_t s) {
  check_cuda(cudaMemsetAsync(inv, 0, slots * sizeof(int64_t), s), "cudaMemsetAsync");
  inverse_kernel<<<grid_for(slots, kRowBlock), kRowBlock, 0, s>>>(sort_idx, slots, inv);
  check_launch("inverse_kernel");
}

}  // namespace

i64 permute_workspace_bytes(i64 slots, int E) {
  const int64_t c = num_chunks(slots);
  const int64_t plan = c * (E + 1) * (sizeof(int) + sizeof(int64_t)) + 16;
  const int64_t inv = slots * static_cast<int64_t>(sizeof(int64_t));
  return plan > inv ? plan : inv;
}

void permute_forward(u64 x, u64 ids, i64 T, int k, i64 H, int E, int dtype, u64 x_sorted, u64 sort_idx, u64 offsets,
                     u64 workspace, u64 stream, int device) {
  check_dtype(dtype);
  if (E < 1 || k < 1) throw std::invalid_argument("cumo_kernels._cuda: permute needs E >= 1 and k >= 1");
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  const int64_t slots = T * k;
  const int64_t chunks = num_chunks(slots);
  int64_t* base = ptr<int64_t>(workspace);
  int* counts = reinterpret_cast<int*>(base + chunks * (E + 1));
  if (slots == 0) {
    check_cuda(cudaMemsetAsync(ptr<void>(offsets), 0, (E + 1) * sizeof(int64_t), s), "cudaMemsetAsync");
    return;
  }
  chunk_count_kernel<<<chunks, kChunk, (E + 1) * sizeof(int), s>>>(ptr<const int64_t>(ids), slots, E, counts);
  check_launch("chunk_count_kernel");
  plan_kernel<<<1, 128, 0, s>>>(counts, static_cast<int>(chunks), E, ptr<int64_t>(offsets), base);
  check_launch("plan_kernel");
  scatter_kernel<<<chunks, kChunk, 0, s>>>(ptr<const int64_t>(ids), slots, E, base, ptr<int64_t>(sort_idx));
  check_launch("scatter_kernel");
  if (H == 0) return;
  // A copy needs only the element size.
  if (dtype == kF32)
    gather_rows_kernel<float><<<slots, kRowBlock, 0, s>>>(ptr<const float>(x), ptr<const int64_t>(sort_idx), k, H,
                                                         ptr<float>(x_sorted));
  else
    gather_rows_kernel<uint16_t><<<slots, kRowBlock, 0, s>>>(ptr<const uint16_t>(x), ptr<const int64_t>(sort_idx), k,
                                                            H, ptr<uint16_t>(x_sorted));
  check_launch("gather_rows_kernel");
}

void permute_backward(u64 grad_sorted, u64 sort_idx, i64 T, int k, i64 H, int dtype, u64 grad_x, u64 workspace,
                      u64 stream, int device) {
  check_dtype(dtype);
  DeviceGuard guard(device);
  if (T == 0 || H == 0) return;
  cudaStream_t s = as_stream(stream);
  int64_t* inv = ptr<int64_t>(workspace);
  launch_inverse(ptr<const int64_t>(sort_idx), T * k, inv, s);
  dispatch_dtype(dtype, [&](auto tag) {
    using Tp = decltype(tag);
    sum_slots_kernel<Tp><<<T, kRowBlock, 0, s>>>(ptr<const Tp>(grad_sorted), inv, k, H, nullptr, ptr<Tp>(grad_x));
  });
  check_launch("sum_slots_kernel");
}

void unpermute_forward(u64 y_sorted, u64 sort_idx, u64 weights, i64 T, int k, i64 N, int dtype, u64 out,
                       u64 workspace, u64 stream, int device) {
  check_dtype(dtype);
  DeviceGuard guard(device);
  if (T == 0 || N == 0) return;
  cudaStream_t s = as_stream(stream);
  int64_t* inv = ptr<int64_t>(workspace);
  launch_inverse(ptr<const int64_t>(sort_idx), T * k, inv, s);
  dispatch_dtype(dtype, [&](auto tag) {
    using Tp = decltype(tag);
    sum_slots_kernel<Tp><<<T, kRowBlock, 0, s>>>(ptr<const Tp>(y_sorted), inv, k, N, ptr<const Tp>(weights),
                                                 ptr<Tp>(out));
  });
  check_launch("sum_slots_kernel");
}

void unpermute_backward(u64 grad_out, u64 y_sorted, u64 sort_idx, u64 weights, i64 T, int k, i64 N, int dtype,
                        u64 grad_y_sorted, u64 grad_weights, u64 workspace, u64 stream, int device) {
  check_dtype(dtype);
  DeviceGuard guard(device);
  const int64_t slots = T * k;
  if (slots == 0) return;
  cudaStream_t s = as_stream(stream);
  int64_t* inv = ptr<int64_t>(workspace);
  launch_inverse(ptr<const int64_t>(sort_idx), slots, inv, s);
  dispatch_dtype(dtype, [&](auto tag) {
    using Tp = decltype(tag);
    if (N > 0)
      scale_rows_kernel<Tp><<<slots, kRowBlock, 0, s>>>(ptr<const Tp>(grad_out), ptr<const int64_t>(sort_idx),
                                                        ptr<const Tp>(weights), k, N, ptr<Tp>(grad_y_sorted));
    slot_dot_kernel<Tp><<<grid_for(slots, kRowBlock / 32), kRowBlock, 0, s>>>(
        ptr<const Tp>(y_sorted), ptr<const Tp>(grad_out), inv, slots, k, N, ptr<Tp>(grad_weights));
  });
  check_launch("unpermute backward kernels");
}

}  // namespace cumo
