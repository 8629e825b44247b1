// The CUTLASS tensor-core paths of the grouped GEMM, as grouped_linear.cu sees them. Each takes its
// problem list from the device (built there from the offsets, experts without rows kept out of
// CUTLASS), so nothing synchronises with the host. cuda.py chooses them only for float16/bfloat16
// operands whose rows are 16-byte aligned, on a device whose architecture this build contains.
#pragma once

#include <cstdint>
#include <string>

#include "cutlass_grouped_call.h"

namespace cumo {

// Which CUTLASS paths this build holds, e.g. "sm90a:bf16,fp16" (or "none").
std::string cutlass_build_info();
// Whether a CUTLASS path for compute capability `cc` (major*10+minor) and dtype code is built.
bool cutlass_supports(int cc, int dtype);
// Bytes of device workspace one CUTLASS launch needs (problem list, scratch, CUTLASS's own).
int64_t cutlass_workspace_bytes(int E, int64_t K, int64_t N, int dtype, int device);
// One grouped GEMM (c.kind) through CUTLASS, on c.stream.
void cutlass_grouped(const GroupedCall& c, int dtype);

}  // namespace cumo
