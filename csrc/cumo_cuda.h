// Host-side plumbing shared by the .cu files of cumo_kernels._cuda: errors, the device guard,
// element loads and stores per dtype code. No torch: pointers arrive as integers from Python.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cumo_hd.h"

namespace cumo {

// A CUDA error as a C++ exception (pybind11 turns it into a Python RuntimeError). The two errors
// a machine without a usable GPU returns become "no CUDA device is available".
inline void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear it
    throw std::runtime_error(std::string("cumo_kernels._cuda: no CUDA device is available (") + what + ": " +
                             cudaGetErrorString(err) + ")");
  }
  throw std::runtime_error(std::string("cumo_kernels._cuda: ") + what + ": " + cudaGetErrorString(err));
}

// Makes `device` current for the scope of a call and restores the caller's device after it
// (torch keeps its own notion of the current device). Throws "no CUDA device is available" on a
// machine without one, before anything is launched.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    int count = 0;
    check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    if (count <= 0) check_cuda(cudaErrorNoDevice, "cudaGetDeviceCount");
    if (device < 0 || device >= count)
      throw std::runtime_error("cumo_kernels._cuda: device index " + std::to_string(device) + " out of range (" +
                               std::to_string(count) + " devices)");
    check_cuda(cudaGetDevice(&prev_), "cudaGetDevice");
    if (prev_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() {
    int cur = -1;
    if (cudaGetDevice(&cur) == cudaSuccess && cur != prev_) cudaSetDevice(prev_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

inline void check_launch(const char* kernel) { check_cuda(cudaGetLastError(), kernel); }

inline void check_dtype(int dtype) {
  if (dtype != kF32 && dtype != kF16 && dtype != kBF16)
    throw std::invalid_argument("cumo_kernels._cuda: dtype code " + std::to_string(dtype) +
                                " is not one of 0 (float32), 1 (float16), 2 (bfloat16)");
}

template <typename T>
inline T* ptr(uint64_t address) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(address));
}

inline cudaStream_t as_stream(uint64_t handle) { return reinterpret_cast<cudaStream_t>(static_cast<uintptr_t>(handle)); }

// Element types per dtype code, for kernels templated on the storage type.
template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static __host__ __device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
  static __host__ __device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <>
struct Elem<__half> {
  static __host__ __device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  static __host__ __device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};
template <>
struct Elem<__nv_bfloat16> {
  static __host__ __device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) {
    return __bfloat162float(p[i]);
  }
  static __host__ __device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) {
    p[i] = __float2bfloat16_rn(v);
  }
};

// ---------------------------------------------- activation backward + bias gradient, per lane
// One block per (32 columns, expert), kBiasLanes row lanes: lane l of column n walks the expert's
// rows lo+l, lo+l+kBiasLanes, ... (a warp reads 32 consecutive columns of one row), then the
// lanes' partial sums are added in lane order. The order is fixed, so the result is the same on
// every run (no atomics), and host_act_bias_grad runs these very functions on the CPU.
constexpr int kBiasLanes = 32;

// Lane `lane` of column n over rows [lo, hi) of a [rows, N] tensor: with an activation,
// g = grad_y * act'(pre) rounded to the dtype and stored into grad_pre; without one g = grad_y
// (grad_pre and pre unused). Returns the lane's float32 sum of g.
template <typename T>
__host__ __device__ inline float act_bias_lane(const T* grad_y, const T* pre, T* grad_pre, int64_t N, int64_t n,
                                               int64_t lo, int64_t hi, int lane, int act, int dtype) {
  float acc = 0.f;
#pragma unroll 4
  for (int64_t r = lo + lane; r < hi; r += kBiasLanes) {
    const int64_t i = r * N + n;
    float g = Elem<T>::load(grad_y, i);
    if (act != kNone) {
      g = round_to(g * act_derivative(Elem<T>::load(pre, i), act), dtype);
      Elem<T>::store(grad_pre, i, g);
    }
    acc += g;
  }
  return acc;
}

// parts[0], parts[stride], ..., parts[(kBiasLanes-1)*stride] added in lane order.
CUMO_HD float sum_lanes(const float* parts, int stride) {
  float acc = 0.f;
  for (int l = 0; l < kBiasLanes; ++l) acc += parts[l * stride];
  return acc;
}

// Calls f(T{}) with T the storage type of dtype code `dtype`.
template <typename F>
inline void dispatch_dtype(int dtype, F&& f) {
  check_dtype(dtype);
  if (dtype == kF32)
    f(float{});
  else if (dtype == kF16)
    f(__half{});
  else
    f(__nv_bfloat16{});
}

inline int grid_for(int64_t n, int block) { return static_cast<int>((n + block - 1) / block); }

}  // namespace cumo
