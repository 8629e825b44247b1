// CUTLASS grouped GEMM paths: not built in this revision (the SIMT path of grouped_gemm.cu runs
// every grouped GEMM). cuda.py asks cutlass_supports() before choosing them.
#include <stdexcept>

#include "cutlass_paths.h"

namespace cumo {

int64_t cutlass_workspace_bytes(int64_t, int) { return 0; }
std::string cutlass_build_info() { return "none"; }
bool cutlass_supports(int, int) { return false; }

void cutlass_grouped_forward(uint64_t, uint64_t, uint64_t, uint64_t, int64_t, int64_t, int64_t, int, int, int,
                             uint64_t, uint64_t, uint64_t, cudaStream_t, int) {
  throw std::runtime_error("cumo_kernels._cuda: this build has no CUTLASS grouped GEMM path");
}
void cutlass_grouped_backward(uint64_t, uint64_t, uint64_t, uint64_t, int64_t, int64_t, int64_t, int, int, uint64_t,
                              uint64_t, uint64_t, cudaStream_t, int) {
  throw std::runtime_error("cumo_kernels._cuda: this build has no CUTLASS grouped GEMM path");
}

}  // namespace cumo
