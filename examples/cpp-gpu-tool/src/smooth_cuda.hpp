#pragma once

// The CUDA path of mesh.smooth. Declared always; defined (smooth_cuda.cu) only when the
// project is configured with -DDAGMESH_WITH_CUDA=ON and a CUDA toolkit is found, which defines
// GPU_TOOL_WITH_CUDA=1.

#include <string>
#include <vector>

#include "mesh.hpp"

namespace gpu_tool {

struct CudaDevice {
  bool available = false;
  std::string name;   // e.g. "NVIDIA H100 80GB HBM3"
  std::string error;  // why not available
};

/// Whether a CUDA device can be used (device 0).
CudaDevice cuda_device();

/// smooth_cpu<float> on the GPU: one thread per vertex per iteration, ping-pong buffers.
/// Reports progress (after a device sync) about 50 times over the run; throws Cancelled when
/// the callback returns false, std::runtime_error on CUDA errors.
std::vector<float> smooth_cuda(const Mesh& mesh, int iterations, float lambda,
                               const ProgressFn& progress);

}  // namespace gpu_tool
