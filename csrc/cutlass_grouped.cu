// Dispatch to the CUTLASS grouped GEMM paths this build contains. Built for every arch; the sm90
// kernels live in cutlass_sm90_*.cu, compiled for sm_90a only when CUMO_CUDA_ARCHS has 90a
// (setup.py then defines CUMO_WITH_SM90).
#include <stdexcept>
#include <string>

#include "cumo_hd.h"
#include "cutlass_paths.h"

namespace cumo {

std::string cutlass_build_info() {
#ifdef CUMO_WITH_SM90
  return "sm90a:bf16,fp16(forward,grad_x,grad_w)";
#else
  return "none";
#endif
}

bool cutlass_supports(int cc, int dtype) {
#ifdef CUMO_WITH_SM90
  // sm_90a code runs on compute capability 9.0 exactly.
  return cc == 90 && (dtype == kF16 || dtype == kBF16);
#else
  (void)cc;
  (void)dtype;
  return false;
#endif
}

int64_t cutlass_workspace_bytes(int E, int64_t K, int64_t N, int dtype, int device) {
#ifdef CUMO_WITH_SM90
  if (dtype == kBF16) return static_cast<int64_t>(sm90::workspace_bf16(E, K, N, device));
  if (dtype == kF16) return static_cast<int64_t>(sm90::workspace_fp16(E, K, N, device));
#endif
  (void)E, (void)K, (void)N, (void)device;
  throw std::invalid_argument("cumo_kernels._cuda: no CUTLASS grouped GEMM for dtype code " + std::to_string(dtype) +
                              " in this build (" + cutlass_build_info() + ")");
}

void cutlass_grouped(const GroupedCall& c, int dtype) {
#ifdef CUMO_WITH_SM90
  if (dtype == kBF16) return sm90::run_bf16(c);
  if (dtype == kF16) return sm90::run_fp16(c);
#endif
  (void)c;
  throw std::invalid_argument("cumo_kernels._cuda: no CUTLASS grouped GEMM for dtype code " + std::to_string(dtype) +
                              " in this build (" + cutlass_build_info() + ")");
}

}  // namespace cumo
