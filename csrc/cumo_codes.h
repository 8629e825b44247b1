// The codes and limits the kernels and the Python side share, in plain C++ (no CUDA headers):
// cumo_hd.h (device code) and bindings.cpp (host compiler) both include this, and bindings.cpp
// exports the values to Python (DTYPE_CODES, ACTIVATION_CODES, MAX_EXPERTS), which
// cumo_kernels/cuda.py reads.
#pragma once

namespace cumo {

// dtype codes: exported by bindings.cpp (DTYPE_CODES), which cumo_kernels/cuda.py reads
enum Dtype : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// activation codes: exported by bindings.cpp (ACTIVATION_CODES); the values are the package's
// numbering, cumo_kernels/_activations.py ACTIVATION_CODES (tests/test_cuda_ext.py checks they agree)
enum Act : int { kNone = 0, kQuickGelu = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kRelu = 5 };

// The most experts the routing kernels take (checked in Python, which falls back under `auto`;
// bindings.cpp exports it as MAX_EXPERTS, the value cumo_kernels/cuda.py uses): one token's E
// scores are spread over a warp's registers, kMaxExperts / 32 per lane (routing.cu). top_k is any
// 1 <= k <= E.
constexpr int kMaxExperts = 256;

}  // namespace cumo
