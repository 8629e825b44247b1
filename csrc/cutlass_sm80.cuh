// CUTLASS 2.x GemmGrouped for the expert layers on sm80-class GPUs (CUTLASS 3.x has no grouped
// GEMM for sm80: its "array" kernel is fixed-shape batched). Included only by
// cutlass_sm80_<dtype>.cu, which setup.py compiles for the 8.x archs of CUMO_CUDA_ARCHS.
//
// The same three kinds and the same device-built problem list as cutlass_sm90.cuh: experts with
// rows first, dummy one-row problems (zero operand, scratch output) behind them, so the problem
// count is the host-known E and no zero-size problem reaches CUTLASS. Problem sizes live only on
// the device: the kernel's scheduler runs in kDeviceOnly mode, the threadblock count is one full
// wave from the occupancy (no host problem sizes needed).
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/device/gemm_grouped.h"
#include "cutlass/gemm/gemm.h"
#include "cutlass/gemm/kernel/default_gemm_grouped.h"
#include "cutlass_grouped_call.h"

namespace cumo {
namespace sm80 {

using Coord = cutlass::gemm::GemmCoord;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

template <typename Element, typename LayoutA, typename LayoutB>
struct Grouped {
  static constexpr int kAlign = 8;  // 16 bytes of 16-bit elements
  using Epilogue = cutlass::epilogue::thread::LinearCombination<Element, kAlign, float, float,
                                                                cutlass::epilogue::thread::ScaleType::OnlyAlphaScaling>;
  using Kernel = typename cutlass::gemm::kernel::DefaultGemmGrouped<
      Element, LayoutA, cutlass::ComplexTransform::kNone, kAlign, Element, LayoutB, cutlass::ComplexTransform::kNone,
      kAlign, Element, RowMajor, float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue, cutlass::gemm::threadblock::GemmBatchedIdentityThreadblockSwizzle,
      4, cutlass::gemm::kernel::GroupScheduleMode::kDeviceOnly>::GemmKernel;
  using Gemm = cutlass::gemm::device::GemmGrouped<Kernel>;
};

template <typename Element>
struct ProblemList {
  Coord* shapes;
  Element** a;
  Element** b;
  Element** d;
  int64_t* lda;
  int64_t* ldb;
  int64_t* ldd;
  Element* zero;         // a zero row of max(N, K) elements
  Element* scratch;      // E dummy output rows of max(N, K) elements
  GroupedProblem* list;  // E entries: the list before it becomes CUTLASS's arrays
};

// Thread 0 builds the list with cumo_hd.h's build_problem_list (checked on the CPU by
// host_tests.cu), then one thread per entry writes CUTLASS's arrays.
template <typename Element>
__global__ void setup_kernel(int kind, ProblemList<Element> pl, const int64_t* offsets, int E, int64_t M, int64_t K,
                             int64_t N,
                             Element* a, Element* b, Element* d) {
  if (threadIdx.x == 0) build_problem_list(kind, offsets, E, M, K, N, pl.list);
  __syncthreads();
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    const GroupedProblem p = pl.list[i];
    pl.shapes[i] = Coord(p.m, p.n, p.k);
    pl.a[i] = (p.dummy ? pl.zero : a) + p.a;
    pl.b[i] = (p.dummy && kind == kGradW ? pl.zero : b) + p.b;
    pl.d[i] = (p.dummy ? pl.scratch : d) + p.d;
    pl.lda[i] = p.lda;
    pl.ldb[i] = p.ldb;
    pl.ldd[i] = p.ldd;
  }
}

template <typename Element>
__global__ void zero_empty_experts_kernel(const int64_t* offsets, int E, int64_t M, int64_t per_expert,
                                          Element* grad_w) {
  const int e = blockIdx.y;
  int64_t begin, end;
  group_rows(offsets, E, M, e, begin, end);
  if (end > begin) return;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_expert;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    grad_w[e * per_expert + i] = Element(0.f);
}

// The problem list's layout (cumo_hd.h's list_layout: the one rule of both the sizing and the
// carving); the strides are the int64 leading dimensions.
template <typename Element>
ListLayout layout(uint64_t base, int E, int64_t K, int64_t N) {
  return list_layout(base, E, N > K ? N : K, sizeof(Coord), sizeof(int64_t), sizeof(int64_t), sizeof(int64_t),
                     sizeof(Element));
}

// CUTLASS 2.x's grouped GEMM takes no workspace of its own (run_kind checks that).
template <typename Element>
size_t list_bytes(int E, int64_t K, int64_t N) {
  return list_workspace_bytes(E, N > K ? N : K, sizeof(Coord), sizeof(int64_t), sizeof(int64_t), sizeof(int64_t),
                              sizeof(Element), 0);
}

template <typename G>
int threadblocks(int device) {
  static int cache[64] = {};
  if (device >= 0 && device < 64 && cache[device] > 0) return cache[device];
  const int n = G::Gemm::sufficient();
  if (n <= 0) throw std::runtime_error("cumo_kernels._cuda: sm80 grouped GEMM: no threadblock fits on this device");
  if (device >= 0 && device < 64) cache[device] = n;
  return n;
}

template <typename Element, typename G>
void run_kind(const GroupedCall& c) {
  const int64_t width = c.N > c.K ? c.N : c.K;
  const ListLayout l = layout<Element>(c.workspace, c.E, c.K, c.N);
  ProblemList<Element> pl;
  pl.shapes = reinterpret_cast<Coord*>(l.shapes);
  pl.a = reinterpret_cast<Element**>(l.a);
  pl.b = reinterpret_cast<Element**>(l.b);
  pl.d = reinterpret_cast<Element**>(l.d);
  pl.lda = reinterpret_cast<int64_t*>(l.sa);
  pl.ldb = reinterpret_cast<int64_t*>(l.sb);
  pl.ldd = reinterpret_cast<int64_t*>(l.sd);
  pl.zero = reinterpret_cast<Element*>(l.zero);
  pl.scratch = reinterpret_cast<Element*>(l.scratch);
  pl.list = reinterpret_cast<GroupedProblem*>(l.list);
  if (l.end > c.workspace + c.workspace_bytes)
    throw std::runtime_error("cumo_kernels._cuda: sm80 grouped GEMM workspace too small");

  cudaError_t err = cudaMemsetAsync(pl.zero, 0, sizeof(Element) * width, c.stream);
  if (err != cudaSuccess) throw std::runtime_error(std::string("cumo_kernels._cuda: ") + cudaGetErrorString(err));
  setup_kernel<Element><<<1, 128, 0, c.stream>>>(c.kind, pl, reinterpret_cast<const int64_t*>(c.offsets), c.E, c.M,
                                                 c.K, c.N,
                                                reinterpret_cast<Element*>(c.a), reinterpret_cast<Element*>(c.b),
                                                reinterpret_cast<Element*>(c.d));
  err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm80 setup_kernel: ") + cudaGetErrorString(err));

  typename G::Gemm::EpilogueOutputOp::Params epilogue(1.f, 0.f);
  typename G::Gemm::Arguments args(pl.shapes, c.E, threadblocks<G>(c.device), epilogue, pl.a, pl.b, pl.d, pl.d, pl.lda,
                                   pl.ldb, pl.ldd, pl.ldd);
  typename G::Gemm gemm;
  if (G::Gemm::get_workspace_size(args) != 0)
    throw std::runtime_error("cumo_kernels._cuda: sm80 grouped GEMM unexpectedly asks for a workspace");
  cutlass::Status st = gemm.initialize(args, nullptr, c.stream);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm80 grouped GEMM initialize: ") +
                             cutlassGetStatusString(st));
  st = gemm.run(c.stream);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm80 grouped GEMM run: ") + cutlassGetStatusString(st));
  if (c.kind == kGradW) {
    const int64_t per = c.N * c.K;
    const dim3 grid(static_cast<unsigned>(per < 256 * 64 ? (per + 255) / 256 : 64), c.E);
    zero_empty_experts_kernel<Element><<<grid, 256, 0, c.stream>>>(reinterpret_cast<const int64_t*>(c.offsets), c.E, c.M,
                                                                   per,
                                                                   reinterpret_cast<Element*>(c.d));
  }
  err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm80 grouped GEMM launch: ") + cudaGetErrorString(err));
}

template <typename Element>
void run(const GroupedCall& c) {
  if (c.kind == kForward)
    run_kind<Element, Grouped<Element, RowMajor, ColumnMajor>>(c);
  else if (c.kind == kGradX)
    run_kind<Element, Grouped<Element, RowMajor, RowMajor>>(c);
  else
    run_kind<Element, Grouped<Element, ColumnMajor, RowMajor>>(c);
}

}  // namespace sm80
}  // namespace cumo
