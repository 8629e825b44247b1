// Dispatch to the CUTLASS grouped GEMM paths this build contains. Built for every arch; the sm90
// kernels live in cutlass_sm90_*.cu, compiled for sm_90a only when CUMO_CUDA_ARCHS has 90a
// (setup.py then defines CUMO_WITH_SM90); the sm80 ones in cutlass_sm80_*.cu, compiled for the
// 8.x archs of the list (setup.py then defines CUMO_SM80_ARCHS, e.g. 80 or 80,86: the SASS of
// 8.0 runs on 8.6 and 8.9 too).
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cumo_hd.h"
#include "cutlass_paths.h"

namespace cumo {

namespace {

// The compute capability of the device a call runs on (cached per device).
int capability(int device) {
  static int cache[64] = {};
  if (device >= 0 && device < 64 && cache[device]) return cache[device];
  int major = 0, minor = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  const int cc = major * 10 + minor;
  if (device >= 0 && device < 64) cache[device] = cc;
  return cc;
}

[[noreturn]] void no_path(int dtype, int cc) {
  throw std::invalid_argument("cumo_kernels._cuda: no CUTLASS grouped GEMM for dtype code " + std::to_string(dtype) +
                              " on compute capability " + std::to_string(cc) + " in this build (" +
                              cutlass_build_info() + ")");
}

}  // namespace

std::string cutlass_build_info() {
  std::string out;
#ifdef CUMO_WITH_SM90
  out += "sm90a:bf16,fp16(forward,grad_x,grad_w)";
#endif
#ifdef CUMO_SM80_ARCHS
  out += std::string(out.empty() ? "" : " ") + "sm80[" CUMO_SM80_ARCHS "]:bf16,fp16(forward,grad_x,grad_w)";
#endif
  return out.empty() ? "none" : out;
}

bool cutlass_supports(int cc, int dtype) {
  if (dtype != kF16 && dtype != kBF16) return false;
#ifdef CUMO_WITH_SM90
  if (cc == 90) return true;  // sm_90a code runs on compute capability 9.0 exactly
#endif
#ifdef CUMO_SM80_ARCHS
  if (cc >= 80 && cc < 90) return true;  // 8.x: the sm_80 SASS runs on every 8.x device
#endif
  (void)cc;
  return false;
}

int64_t cutlass_workspace_bytes(int E, int64_t K, int64_t N, int dtype, int device) {
  const int cc = capability(device);
  (void)E, (void)K, (void)N;
#ifdef CUMO_WITH_SM90
  if (cc == 90 && dtype == kBF16) return static_cast<int64_t>(sm90::workspace_bf16(E, K, N, device));
  if (cc == 90 && dtype == kF16) return static_cast<int64_t>(sm90::workspace_fp16(E, K, N, device));
#endif
#ifdef CUMO_SM80_ARCHS
  if (cc >= 80 && cc < 90 && dtype == kBF16) return static_cast<int64_t>(sm80::workspace_bf16(E, K, N));
  if (cc >= 80 && cc < 90 && dtype == kF16) return static_cast<int64_t>(sm80::workspace_fp16(E, K, N));
#endif
  no_path(dtype, cc);
}

void cutlass_grouped(const GroupedCall& c, int dtype) {
  const int cc = capability(c.device);
#ifdef CUMO_WITH_SM90
  if (cc == 90 && dtype == kBF16) return sm90::run_bf16(c);
  if (cc == 90 && dtype == kF16) return sm90::run_fp16(c);
#endif
#ifdef CUMO_SM80_ARCHS
  if (cc >= 80 && cc < 90 && dtype == kBF16) return sm80::run_bf16(c);
  if (cc >= 80 && cc < 90 && dtype == kF16) return sm80::run_fp16(c);
#endif
  no_path(dtype, cc);
}

}  // namespace cumo
