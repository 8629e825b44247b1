// Device queries and what this build contains.
#include "cumo_cuda.h"
#include "cumo_ops.h"
#include "cutlass_paths.h"

#ifndef CUMO_ARCHS
#define CUMO_ARCHS "unknown"
#endif

namespace cumo {

int device_count() {
  int count = 0;
  check_cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count <= 0) check_cuda(cudaErrorNoDevice, "cudaGetDeviceCount");
  return count;
}

int device_capability(int device) {
  DeviceGuard guard(device);
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device), "cudaDeviceGetAttribute");
  return major * 10 + minor;
}

std::string build_info() {
  return std::string("archs=") + CUMO_ARCHS + " cuda_runtime=" + std::to_string(CUDART_VERSION) +
         " cutlass=" + cutlass_build_info();
}

}  // namespace cumo
