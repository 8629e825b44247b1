// The sm90 grouped GEMM for float16 (three layouts: forward, grad_x, grad_w). sm_90a only.
#include "cutlass_sm90.cuh"

namespace cumo::sm90 {
void run_fp16(const GroupedCall& c) { run<cutlass::half_t>(c); }
size_t workspace_fp16(int E, int64_t K, int64_t N, int device) { return workspace<cutlass::half_t>(E, K, N, device); }
}  // namespace cumo::sm90
