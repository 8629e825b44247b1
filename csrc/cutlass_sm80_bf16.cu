// The sm80 grouped GEMM (CUTLASS 2.x GemmGrouped) for bfloat16: forward, grad_x, grad_w. 8.x archs only.
#include "cutlass_sm80.cuh"

namespace cumo::sm80 {
void run_bf16(const GroupedCall& c) { run<cutlass::bfloat16_t>(c); }
size_t workspace_bf16(int E, int64_t K, int64_t N) { return list_bytes<cutlass::bfloat16_t>(E, K, N); }
}  // namespace cumo::sm80
