// Grouped GEMM of the expert layers: forward y = act(x @ W[e]^T + b[e]) on each expert's rows,
// and the backward (grad_x = g @ W[e], grad_W[e] = g^T @ x, grad_b[e] = sum of g's rows, with
// g = grad_y * act'(pre)).
//
// Path in this file: tiled SIMT kernels of this project (float32 accumulation, any dtype code,
// any size and alignment, bias and activation fused in the epilogue). The per-expert problem list
// is built on the device (a row-tile schedule from the offsets, empty experts get no tile), so
// nothing synchronises with the host. Rows offsets[E]:M belong to no expert (the dropped slots of
// permute): y, pre and grad_x are zero there. Offsets are clamped as read (cumo_hd.h's group_rows):
// wrong offsets give wrong rows, never an access out of bounds. The CUTLASS tensor-core paths (cutlass_sm90.cu,
// cutlass_sm80.cu) take over where they are built and the operands suit them (cuda.py decides).
#include "cumo_cuda.h"
#include "cumo_ops.h"
#include "cutlass_paths.h"

namespace cumo {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, kThreads = 256;

__global__ void tile_schedule_kernel(const int64_t* __restrict__ offsets, int E, int64_t M, int bm,
                                     int* __restrict__ tiles) {
  if (threadIdx.x == 0 && blockIdx.x == 0) build_tile_schedule(offsets, E, M, bm, tiles);
}

template <typename T>
__device__ __forceinline__ float round_as(float v) {
  T tmp;
  Elem<T>::store(&tmp, 0, v);
  return Elem<T>::load(&tmp, 0);
}

// C[r, c] = epilogue(sum_q A[r, q] * B_e(q, c)) for the rows r of expert e, where
// B_e(q, c) = B[e * strideE + q * sbk + c * sbn]. One block per (row tile of one group, column
// tile); the tiles of group E (rows offsets[E]:M, dropped slots) store zeros (every activation
// maps 0 to 0, so pre and C are both 0 there).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_rows_gemm_kernel(const T* __restrict__ A, int64_t lda, int64_t Kred, const T* __restrict__ B,
                             int64_t strideE, int64_t sbk, int64_t sbn, int64_t Ncols, const T* __restrict__ bias,
                             int act, T* __restrict__ C, T* __restrict__ pre, const int64_t* __restrict__ offsets,
                             const int* __restrict__ tiles, int E, int64_t M) {
  const int e = find_tile_expert(tiles, E + 1, blockIdx.x);
  if (e < 0) return;
  int64_t begin, row_end;
  group_rows(offsets, E, M, e, begin, row_end);
  const int64_t row0 = begin + static_cast<int64_t>(blockIdx.x - tiles[e]) * BM;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * BN;
  if (e == E) {
    for (int i = threadIdx.x; i < BM * BN; i += kThreads) {
      const int64_t gr = row0 + i / BN, gc = col0 + i % BN;
      if (gr >= row_end || gc >= Ncols) continue;
      Elem<T>::store(C, gr * Ncols + gc, 0.f);
      if (act != kNone) Elem<T>::store(pre, gr * Ncols + gc, 0.f);
    }
    return;
  }
  const T* Be = B + e * strideE;

  __shared__ float As[BK][BM + 1];
  __shared__ float Bs[BK][BN + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  float acc[4][4] = {};
  for (int64_t q0 = 0; q0 < Kred; q0 += BK) {
    for (int i = tid; i < BM * BK; i += kThreads) {
      const int r = i / BK, q = i % BK;  // consecutive threads read along a row of A
      const int64_t gr = row0 + r, gq = q0 + q;
      As[q][r] = (gr < row_end && gq < Kred) ? Elem<T>::load(A, gr * lda + gq) : 0.f;
    }
    for (int i = tid; i < BN * BK; i += kThreads) {
      // Consecutive threads walk B's contiguous direction (K of W in the forward, N in grad_x).
      const int c = sbn == 1 ? i % BN : i / BK, q = sbn == 1 ? i / BN : i % BK;
      const int64_t gc = col0 + c, gq = q0 + q;
      Bs[q][c] = (gc < Ncols && gq < Kred) ? Elem<T>::load(Be, gq * sbk + gc * sbn) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < BK; ++q) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[q][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[q][tx * 4 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gr = row0 + ty * 4 + i;
    if (gr >= row_end) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gc = col0 + tx * 4 + j;
      if (gc >= Ncols) continue;
      float v = acc[i][j];
      if (bias) v += Elem<T>::load(bias, e * Ncols + gc);
      if (act != kNone) {
        Elem<T>::store(pre, gr * Ncols + gc, v);
        v = act_apply(round_as<T>(v), act);
      }
      Elem<T>::store(C, gr * Ncols + gc, v);
    }
  }
}

// grad_W[e][n][c] = sum over expert e's rows r of G[r, n] * X[r, c]; zero for an empty expert.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grouped_wgrad_kernel(const T* __restrict__ G, const T* __restrict__ X, int64_t N, int64_t K,
                         const int64_t* __restrict__ offsets, int E, int64_t M, T* __restrict__ grad_w) {
  const int e = blockIdx.z;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BM, c0 = static_cast<int64_t>(blockIdx.x) * BN;
  int64_t r_begin, r_end;
  group_rows(offsets, E, M, e, r_begin, r_end);
  __shared__ float Gs[BK][BM + 1];
  __shared__ float Xs[BK][BN + 1];
  const int tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  float acc[4][4] = {};
  for (int64_t r0 = r_begin; r0 < r_end; r0 += BK) {
    for (int i = tid; i < BM * BK; i += kThreads) {
      const int q = i / BM, n = i % BM;  // consecutive threads read along a row of G
      const int64_t gr = r0 + q, gn = n0 + n;
      Gs[q][n] = (gr < r_end && gn < N) ? Elem<T>::load(G, gr * N + gn) : 0.f;
    }
    for (int i = tid; i < BN * BK; i += kThreads) {
      const int q = i / BN, c = i % BN;
      const int64_t gr = r0 + q, gc = c0 + c;
      Xs[q][c] = (gr < r_end && gc < K) ? Elem<T>::load(X, gr * K + gc) : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int q = 0; q < BK; ++q) {
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(Gs[q][ty * 4 + i], Xs[q][tx * 4 + j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t gn = n0 + ty * 4 + i;
    if (gn >= N) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t gc = c0 + tx * 4 + j;
      if (gc < K) Elem<T>::store(grad_w, (e * N + gn) * K + gc, acc[i][j]);
    }
  }
}

// The backward's pass over g = grad_y * act'(pre): writes grad_pre (with an activation) and
// grad_b[e][n] = sum of g over expert e's rows (where grad_b is given), in one read of grad_y and
// pre. Block (32 columns, kBiasLanes row lanes), grid (column tiles, E); see act_bias_lane.
// grad_pre is written on the experts' rows; the rows offsets[E]:M (dropped slots) are read by no
// GEMM after it.
template <typename T>
__global__ void __launch_bounds__(32 * kBiasLanes)
    act_bias_grad_kernel(const T* __restrict__ grad_y, const T* __restrict__ pre, int64_t N,
                         const int64_t* __restrict__ offsets, int E, int64_t M, int act, int dtype,
                         T* __restrict__ grad_pre, T* __restrict__ grad_b) {
  __shared__ float parts[kBiasLanes][33];
  const int e = blockIdx.y;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  int64_t lo, hi;
  group_rows(offsets, E, M, e, lo, hi);
  float acc = 0.f;
  if (n < N) acc = act_bias_lane(grad_y, pre, grad_pre, N, n, lo, hi, threadIdx.y, act, dtype);
  if (grad_b == nullptr) return;  // uniform over the block: no thread is left at the barrier
  parts[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && n < N) Elem<T>::store(grad_b, e * N + n, sum_lanes(&parts[0][threadIdx.x], 33));
}

// The epilogue after a CUTLASS GEMM (whose own epilogue stores acc rounded to the dtype): one
// block per row; v = d + bias[e]; with an activation pre = v and y = act(pre), else y = v. The rows
// offsets[E]:M (dropped slots, which CUTLASS does not write) get zeros.
// In place: d is `pre` (with an activation) or `y` (without), so d, pre and y are not __restrict__
// (each element is read once and then written by the same thread).
template <typename T>
__global__ void bias_act_kernel(const T* d, const T* __restrict__ bias, const int64_t* __restrict__ offsets, int E,
                                int64_t M, int64_t N, int act, T* pre, T* y) {
  const int64_t r = blockIdx.x;
  int64_t tail, unused;
  group_rows(offsets, E, M, E, tail, unused);
  if (r >= tail) {
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
      if (act != kNone) Elem<T>::store(pre, r * N + n, 0.f);
      Elem<T>::store(y, r * N + n, 0.f);
    }
    return;
  }
  int lo = 0, hi = E - 1;  // the expert owning row r: the last e with offsets[e] <= r
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (offsets[mid] <= r)
      lo = mid;
    else
      hi = mid - 1;
  }
  for (int64_t n = threadIdx.x; n < N; n += blockDim.x) {
    float v = Elem<T>::load(d, r * N + n);
    if (bias) v += Elem<T>::load(bias, lo * N + n);
    if (act != kNone) {
      Elem<T>::store(pre, r * N + n, v);
      v = act_apply(round_as<T>(v), act);
    }
    Elem<T>::store(y, r * N + n, v);
  }
}

// out[r, :] = 0 for the rows offsets[E]:M (dropped slots), which the CUTLASS GEMMs do not write:
// grid-stride over those rows (none in moe_mlp's own calls: every block returns at once).
template <typename T>
__global__ void zero_dropped_rows_kernel(const int64_t* __restrict__ offsets, int E, int64_t M, int64_t N,
                                         T* __restrict__ out) {
  int64_t tail, end;
  group_rows(offsets, E, M, E, tail, end);
  for (int64_t r = tail + blockIdx.x; r < end; r += gridDim.x)
    for (int64_t n = threadIdx.x; n < N; n += blockDim.x) Elem<T>::store(out, r * N + n, 0.f);
}

template <typename T>
void zero_dropped_rows(const int64_t* offsets, int E, i64 M, i64 N, u64 out, cudaStream_t s) {
  if (M == 0 || N == 0) return;
  const unsigned grid = static_cast<unsigned>(M < 1024 ? M : 1024);
  zero_dropped_rows_kernel<T><<<grid, 256, 0, s>>>(offsets, E, M, N, ptr<T>(out));
  check_launch("zero_dropped_rows_kernel");
}

GroupedCall make_call(int kind, u64 a, u64 b, u64 d, u64 offsets, i64 M, i64 K, i64 N, int E, u64 workspace,
                      i64 ws_bytes, cudaStream_t s, int device) {
  GroupedCall c{};
  c.kind = kind;
  c.M = M;
  c.K = K;
  c.N = N;
  c.E = E;
  c.a = a;
  c.b = b;
  c.d = d;
  c.offsets = offsets;
  c.workspace = workspace;
  c.workspace_bytes = static_cast<uint64_t>(ws_bytes);
  c.stream = s;
  c.device = device;
  return c;
}

constexpr i64 kTilesBytes = 4352;  // the SIMT tile schedule: (E+2) ints, E <= 1023, 256-byte multiple

void check_gemm_args(int E, int act, i64 M, i64 K, i64 N) {
  if (E < 1 || E > 1023) throw std::invalid_argument("cumo_kernels._cuda: grouped GEMM needs 1 <= E <= 1023");
  if (act < kNone || act > kRelu)
    throw std::invalid_argument("cumo_kernels._cuda: activation code " + std::to_string(act) + " is not in 0..5");
  if (M < 0 || K < 0 || N < 0) throw std::invalid_argument("cumo_kernels._cuda: negative GEMM size");
}

int* tile_schedule(const int64_t* offsets, int E, i64 M, u64 workspace, cudaStream_t s) {
  int* tiles = ptr<int>(workspace);
  tile_schedule_kernel<<<1, 32, 0, s>>>(offsets, E, M, BM, tiles);
  check_launch("tile_schedule_kernel");
  return tiles;
}

}  // namespace

i64 gemm_workspace_bytes(i64 M, i64 K, i64 N, int E, int dtype, bool use_cutlass, int device) {
  (void)M;
  if (!use_cutlass) return kTilesBytes;
  DeviceGuard guard(device);
  return kTilesBytes + cutlass_workspace_bytes(E, K, N, dtype, device);
}

void grouped_linear_forward(u64 x, u64 weight, u64 bias, u64 offsets, i64 M, i64 K, i64 N, int E, int dtype,
                            int act, u64 y, u64 pre, u64 workspace, i64 workspace_bytes, bool use_cutlass, u64 stream,
                            int device) {
  check_dtype(dtype);
  check_gemm_args(E, act, M, K, N);
  DeviceGuard guard(device);
  if (M == 0 || N == 0) return;
  cudaStream_t s = as_stream(stream);
  if (use_cutlass) {
    if (K == 0) throw std::invalid_argument("cumo_kernels._cuda: the CUTLASS path needs K > 0");
    const u64 d = act != kNone ? pre : y;
    cutlass_grouped(make_call(kForward, x, weight, d, offsets, M, K, N, E, workspace + kTilesBytes,
                              workspace_bytes - kTilesBytes, s, device),
                    dtype);
    dispatch_dtype(dtype, [&](auto tag) {
      using Tp = decltype(tag);
      if (bias || act != kNone) {
        bias_act_kernel<Tp><<<M, 256, 0, s>>>(ptr<const Tp>(d), ptr<const Tp>(bias), ptr<const int64_t>(offsets), E, M,
                                              N, act, ptr<Tp>(pre), ptr<Tp>(y));
        check_launch("bias_act_kernel");
      } else {
        zero_dropped_rows<Tp>(ptr<const int64_t>(offsets), E, M, N, y, s);
      }
    });
    return;
  }
  const int64_t* off = ptr<const int64_t>(offsets);
  int* tiles = tile_schedule(off, E, M, workspace, s);
  const dim3 grid(max_tiles(M, E, BM), grid_for(N, BN));
  if (grid.y > 65535) throw std::invalid_argument("cumo_kernels._cuda: N too large for the grouped GEMM grid");
  dispatch_dtype(dtype, [&](auto tag) {
    using Tp = decltype(tag);
    grouped_rows_gemm_kernel<Tp><<<grid, kThreads, 0, s>>>(ptr<const Tp>(x), K, K, ptr<const Tp>(weight), N * K, 1,
                                                           K, N, ptr<const Tp>(bias), act, ptr<Tp>(y), ptr<Tp>(pre),
                                                           off, tiles, E, M);
  });
  check_launch("grouped_rows_gemm_kernel");
}

void grouped_linear_backward(u64 grad_y, u64 x, u64 weight, u64 offsets, u64 pre, i64 M, i64 K, i64 N, int E,
                             int dtype, int act, u64 grad_x, u64 grad_w, u64 grad_b, u64 grad_pre, u64 workspace,
                             i64 workspace_bytes, bool use_cutlass, u64 stream, int device) {
  check_dtype(dtype);
  check_gemm_args(E, act, M, K, N);
  DeviceGuard guard(device);
  cudaStream_t s = as_stream(stream);
  const int64_t* off = ptr<const int64_t>(offsets);
  dispatch_dtype(dtype, [&](auto tag) {
    using Tp = decltype(tag);
    const Tp* g = ptr<const Tp>(grad_y);
    if ((act != kNone || grad_b) && N > 0) {
      // One pass: grad_pre (with an activation) and grad_b (with a bias). Before this, the two were
      // separate kernels and grad_b ran one thread per column over an expert's rows.
      act_bias_grad_kernel<Tp><<<dim3(grid_for(N, 32), E), dim3(32, kBiasLanes), 0, s>>>(
          g, ptr<const Tp>(pre), N, off, E, M, act, dtype, ptr<Tp>(grad_pre), ptr<Tp>(grad_b));
      check_launch("act_bias_grad_kernel");
      if (act != kNone && M > 0) g = ptr<const Tp>(grad_pre);  // (no grad_pre is allocated when M == 0)
    }
    if (use_cutlass) {
      if (M == 0 || N == 0 || K == 0) throw std::invalid_argument("cumo_kernels._cuda: the CUTLASS path needs M, N, K > 0");
      const u64 gp = reinterpret_cast<u64>(g);
      cutlass_grouped(make_call(kGradW, gp, x, grad_w, offsets, M, K, N, E, workspace + kTilesBytes,
                                workspace_bytes - kTilesBytes, s, device),
                      dtype);
      cutlass_grouped(make_call(kGradX, gp, weight, grad_x, offsets, M, K, N, E, workspace + kTilesBytes,
                                workspace_bytes - kTilesBytes, s, device),
                      dtype);
      zero_dropped_rows<Tp>(off, E, M, K, grad_x, s);
      return;
    }
    if (N > 0 && K > 0) {
      const dim3 wgrid(grid_for(K, BN), grid_for(N, BM), E);
      if (wgrid.y > 65535) throw std::invalid_argument("cumo_kernels._cuda: N too large for the wgrad grid");
      grouped_wgrad_kernel<Tp><<<wgrid, kThreads, 0, s>>>(g, ptr<const Tp>(x), N, K, off, E, M, ptr<Tp>(grad_w));
      check_launch("grouped_wgrad_kernel");
    }
    if (M > 0 && K > 0) {
      if (N == 0) {
        check_cuda(cudaMemsetAsync(ptr<void>(grad_x), 0, M * K * sizeof(Tp), s), "cudaMemsetAsync");
        return;
      }
      int* tiles = tile_schedule(off, E, M, workspace, s);
      const dim3 grid(max_tiles(M, E, BM), grid_for(K, BN));
      if (grid.y > 65535) throw std::invalid_argument("cumo_kernels._cuda: K too large for the grouped GEMM grid");
      grouped_rows_gemm_kernel<Tp><<<grid, kThreads, 0, s>>>(g, N, N, ptr<const Tp>(weight), N * K, K, 1, K, nullptr,
                                                             kNone, ptr<Tp>(grad_x), nullptr, off, tiles, E, M);
      check_launch("grouped_rows_gemm_kernel (grad_x)");
    }
  });
}

}  // namespace cumo
