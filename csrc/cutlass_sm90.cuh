// CUTLASS 3.x sm90 warp-specialised ptr-array grouped GEMM for the expert layers (Hopper, sm_90a).
// Included only by cutlass_sm90_<dtype>.cu, which setup.py compiles for sm_90a alone.
//
// One GEMM kind per layout pair, all row-major tensors of this project:
//   kForward: y[rows_e, N]  = x[rows_e, K] . W[e]^T         A row-major, B "column-major" (W is [N, K])
//   kGradX:   gx[rows_e, K] = g[rows_e, N] . W[e]           A row-major, B row-major
//   kGradW:   gW[e] [N, K]  = g[rows_e, N]^T . x[rows_e, K] A column-major, B row-major
// The problem list (shapes, pointers, strides) is written on the device by a setup kernel from the
// offsets (cumo_hd.h's build_problem_list): experts with rows first, in order; the tail of the list
// (experts without rows) holds dummy 1-row problems that read a zero row and write a scratch row,
// so the group count is the host-known E, no zero-size group reaches CUTLASS (DESIGN.md), and
// nothing syncs with the host.
// kGradW's empty experts get zero gradients from a separate kernel.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#include "cutlass_grouped_call.h"

namespace cumo {
namespace sm90 {

using namespace cute;
using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;  // (M, N, K) per group
using Shape3 = ProblemShape::UnderlyingProblemShape;

template <typename Element, typename LayoutA, typename LayoutB>
struct Grouped {
  using Acc = float;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlign = 16 / sizeof(Element);
  using TileShape = Shape<_128, _128, _64>;
  using ClusterShape = Shape<_1, _1, _1>;
  using KernelSchedule = cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative;
  using EpilogueSchedule = cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Acc, Acc, void, LayoutD*, kAlign, Element, LayoutD*, kAlign,
      EpilogueSchedule, cutlass::epilogue::fusion::LinearCombination<Element, Acc, void, Acc>>::CollectiveOp;

  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlign, Element, LayoutB*, kAlign, Acc,
      TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
};

// Device-side problem list of one launch, carved from the caller's workspace.
template <typename Element, typename G>
struct ProblemList {
  Shape3* shapes;
  const Element** a;
  const Element** b;
  Element** d;
  typename G::StrideA* sa;
  typename G::StrideB* sb;
  typename G::StrideD* sd;
  Element* zero;         // a zero row of max(N, K) elements
  Element* scratch;      // E dummy output rows of max(N, K) elements
  GroupedProblem* list;  // E entries: the list before it becomes CUTLASS's arrays
};

// The problem list on the device: thread 0 builds it with cumo_hd.h's build_problem_list (the rule
// host_tests.cu checks on the CPU), then one thread per entry turns it into CUTLASS's arrays.
template <typename Element, typename G>
__global__ void setup_kernel(int kind, ProblemList<Element, G> pl, GroupedProblem* list, const int64_t* offsets, int E,
                             int64_t M, int64_t K, int64_t N, const Element* a, const Element* b, Element* d,
                             typename G::StrideA sa, typename G::StrideB sb, typename G::StrideD sd) {
  if (threadIdx.x == 0) build_problem_list(kind, offsets, E, M, K, N, list);
  __syncthreads();
  for (int i = threadIdx.x; i < E; i += blockDim.x) {
    const GroupedProblem p = list[i];
    pl.shapes[i] = Shape3{p.m, p.n, p.k};
    pl.a[i] = (p.dummy ? pl.zero : a) + p.a;
    pl.b[i] = (p.dummy && kind == kGradW ? pl.zero : b) + p.b;
    pl.d[i] = (p.dummy ? pl.scratch : d) + p.d;
    pl.sa[i] = sa;
    pl.sb[i] = sb;
    pl.sd[i] = sd;
  }
}

// grad_w[e] = 0 for the experts without rows (as build_problem_list counts them).
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

// The problem list's layout for this GEMM type (cumo_hd.h's list_layout: the one rule of both the
// sizing and the carving).
template <typename Element, typename G>
ListLayout layout(uint64_t base, int E, int64_t K, int64_t N) {
  return list_layout(base, E, N > K ? N : K, sizeof(Shape3), sizeof(typename G::StrideA), sizeof(typename G::StrideB),
                     sizeof(typename G::StrideD), sizeof(Element));
}

inline int sm_count(int device) {
  static int cache[64] = {};
  if (device < 0 || device >= 64) return cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  if (cache[device] == 0) cache[device] = cutlass::KernelHardwareInfo::query_device_multiprocessor_count(device);
  return cache[device];
}

template <typename Element, typename G>
typename G::Gemm::Arguments make_args(int E, const ProblemList<Element, G>& pl, int device) {
  cutlass::KernelHardwareInfo hw;
  hw.device_id = device;
  hw.sm_count = sm_count(device);
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGrouped,
      {E, pl.shapes, nullptr},
      {const_cast<const Element**>(pl.a), pl.sa, const_cast<const Element**>(pl.b), pl.sb},
      {{}, nullptr, pl.sd, pl.d, pl.sd},
      hw};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  return args;
}

// Workspace of one kind: the problem list and CUTLASS's own.
template <typename Element, typename G>
size_t kind_workspace(int E, int64_t K, int64_t N, int device) {
  ProblemList<Element, G> pl{};
  auto args = make_args<Element, G>(E, pl, device);
  return list_workspace_bytes(E, N > K ? N : K, sizeof(Shape3), sizeof(typename G::StrideA),
                              sizeof(typename G::StrideB), sizeof(typename G::StrideD), sizeof(Element),
                              G::Gemm::get_workspace_size(args));
}

template <typename Element, typename G>
void run_kind(int kind, const GroupedCall& c, typename G::StrideA sa, typename G::StrideB sb,
              typename G::StrideD sd) {
  const int64_t width = c.N > c.K ? c.N : c.K;
  const ListLayout l = layout<Element, G>(c.workspace, c.E, c.K, c.N);
  ProblemList<Element, G> pl;
  pl.shapes = reinterpret_cast<Shape3*>(l.shapes);
  pl.a = reinterpret_cast<const Element**>(l.a);
  pl.b = reinterpret_cast<const Element**>(l.b);
  pl.d = reinterpret_cast<Element**>(l.d);
  pl.sa = reinterpret_cast<typename G::StrideA*>(l.sa);
  pl.sb = reinterpret_cast<typename G::StrideB*>(l.sb);
  pl.sd = reinterpret_cast<typename G::StrideD*>(l.sd);
  pl.zero = reinterpret_cast<Element*>(l.zero);
  pl.scratch = reinterpret_cast<Element*>(l.scratch);
  pl.list = reinterpret_cast<GroupedProblem*>(l.list);
  char* cutlass_ws = reinterpret_cast<char*>(l.end);

  // The whole workspace (problem list, zero row, scratch, CUTLASS's own) is checked before
  // anything writes into it.
  auto args = make_args<Element, G>(c.E, pl, c.device);
  const size_t need = G::Gemm::get_workspace_size(args);
  const uint64_t ws_end = c.workspace + c.workspace_bytes, ws_at = reinterpret_cast<uint64_t>(cutlass_ws);
  if (ws_at > ws_end || ws_end - ws_at < need)
    throw std::runtime_error("cumo_kernels._cuda: sm90 grouped GEMM workspace too small");

  cudaError_t err = cudaMemsetAsync(pl.zero, 0, sizeof(Element) * width, c.stream);
  if (err != cudaSuccess) throw std::runtime_error(std::string("cumo_kernels._cuda: ") + cudaGetErrorString(err));
  setup_kernel<Element, G><<<1, 128, 0, c.stream>>>(kind, pl, pl.list, reinterpret_cast<const int64_t*>(c.offsets), c.E,
                                                     c.M, c.K, c.N, reinterpret_cast<const Element*>(c.a),
                                                     reinterpret_cast<const Element*>(c.b),
                                                     reinterpret_cast<Element*>(c.d), sa, sb, sd);
  err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm90 setup_kernel: ") + cudaGetErrorString(err));

  typename G::Gemm gemm;
  cutlass::Status st = gemm.can_implement(args);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm90 grouped GEMM cannot implement: ") +
                             cutlassGetStatusString(st));
  st = gemm.initialize(args, cutlass_ws, c.stream);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm90 grouped GEMM initialize: ") +
                             cutlassGetStatusString(st));
  st = gemm.run(c.stream);
  if (st != cutlass::Status::kSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm90 grouped GEMM run: ") + cutlassGetStatusString(st));
  if (kind == kGradW) {
    const int64_t per = c.N * c.K;
    const dim3 grid(static_cast<unsigned>(per < 256 * 64 ? (per + 255) / 256 : 64), c.E);
    zero_empty_experts_kernel<Element><<<grid, 256, 0, c.stream>>>(reinterpret_cast<const int64_t*>(c.offsets), c.E, c.M,
                                                                   per,
                                                                   reinterpret_cast<Element*>(c.d));
  }
  err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("cumo_kernels._cuda: sm90 grouped GEMM launch: ") + cudaGetErrorString(err));
}

using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;

template <typename Element>
struct Kinds {
  using Fwd = Grouped<Element, RowMajor, ColumnMajor>;
  using Dx = Grouped<Element, RowMajor, RowMajor>;
  using Dw = Grouped<Element, ColumnMajor, RowMajor>;
};

template <typename Element>
void run(const GroupedCall& c) {
  using K = Kinds<Element>;
  const int64_t kk = c.K, nn = c.N;
  if (c.kind == kForward) {
    using G = typename K::Fwd;
    run_kind<Element, G>(c.kind, c, cutlass::make_cute_packed_stride(typename G::StrideA{}, {1, int(kk), 1}),
                         cutlass::make_cute_packed_stride(typename G::StrideB{}, {int(nn), int(kk), 1}),
                         cutlass::make_cute_packed_stride(typename G::StrideD{}, {1, int(nn), 1}));
  } else if (c.kind == kGradX) {
    using G = typename K::Dx;
    run_kind<Element, G>(c.kind, c, cutlass::make_cute_packed_stride(typename G::StrideA{}, {1, int(nn), 1}),
                         cutlass::make_cute_packed_stride(typename G::StrideB{}, {int(kk), int(nn), 1}),
                         cutlass::make_cute_packed_stride(typename G::StrideD{}, {1, int(kk), 1}));
  } else {
    using G = typename K::Dw;
    run_kind<Element, G>(c.kind, c, cutlass::make_cute_packed_stride(typename G::StrideA{}, {int(nn), 1, 1}),
                         cutlass::make_cute_packed_stride(typename G::StrideB{}, {int(kk), 1, 1}),
                         cutlass::make_cute_packed_stride(typename G::StrideD{}, {int(nn), int(kk), 1}));
  }
}

template <typename Element>
size_t workspace(int E, int64_t K, int64_t N, int device) {
  using Ks = Kinds<Element>;
  size_t a = kind_workspace<Element, typename Ks::Fwd>(E, K, N, device);
  size_t b = kind_workspace<Element, typename Ks::Dx>(E, K, N, device);
  size_t c = kind_workspace<Element, typename Ks::Dw>(E, K, N, device);
  return std::max(a, std::max(b, c));
}

}  // namespace sm90
}  // namespace cumo
