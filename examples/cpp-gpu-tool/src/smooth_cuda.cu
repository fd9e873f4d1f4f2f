// CUDA path of mesh.smooth: Jacobi Laplacian smoothing, one thread per vertex.
//
// Each iteration reads the previous positions (`in`) and writes new ones (`out`), then the two
// buffers swap: exactly the update of smooth_cpu (mesh.cpp), in float, with the neighbor sums
// taken in the same (ascending) order. The only differences from the CPU double path are float
// rounding and the compiler's fused multiply-adds.

#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "smooth_cuda.hpp"

namespace gpu_tool {

namespace {

#define GPU_TOOL_CUDA_CHECK(expr)                                                          \
  do {                                                                                     \
    const cudaError_t err_ = (expr);                                                       \
    if (err_ != cudaSuccess) {                                                             \
      throw std::runtime_error(std::string(#expr) + " failed: " + cudaGetErrorString(err_)); \
    }                                                                                      \
  } while (0)

__global__ void laplacian_step(const float* __restrict__ in, float* __restrict__ out,
                               const int* __restrict__ offsets, const int* __restrict__ neighbors,
                               int vertex_count, float lambda) {
  const int v = blockIdx.x * blockDim.x + threadIdx.x;
  if (v >= vertex_count) return;
  const int begin = offsets[v];
  const int end = offsets[v + 1];
  const float px = in[3 * v + 0];
  const float py = in[3 * v + 1];
  const float pz = in[3 * v + 2];
  if (begin == end) {
    out[3 * v + 0] = px;
    out[3 * v + 1] = py;
    out[3 * v + 2] = pz;
    return;
  }
  float sx = 0.0f, sy = 0.0f, sz = 0.0f;
  for (int e = begin; e < end; ++e) {
    const int u = neighbors[e];
    sx += in[3 * u + 0];
    sy += in[3 * u + 1];
    sz += in[3 * u + 2];
  }
  const float inv = 1.0f / static_cast<float>(end - begin);
  out[3 * v + 0] = px + lambda * (sx * inv - px);
  out[3 * v + 1] = py + lambda * (sy * inv - py);
  out[3 * v + 2] = pz + lambda * (sz * inv - pz);
}

/// Device memory freed on scope exit, also when an exception (Cancelled) leaves the loop.
template <typename T>
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t count) : count_(std::max<std::size_t>(count, 1)) {
    GPU_TOOL_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&ptr_), count_ * sizeof(T)));
  }
  ~DeviceBuffer() {
    if (ptr_ != nullptr) cudaFree(ptr_);
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }

  void upload(const T* host, std::size_t count) {
    if (count == 0) return;
    GPU_TOOL_CUDA_CHECK(cudaMemcpy(ptr_, host, count * sizeof(T), cudaMemcpyHostToDevice));
  }
  void download(T* host, std::size_t count) const {
    if (count == 0) return;
    GPU_TOOL_CUDA_CHECK(cudaMemcpy(host, ptr_, count * sizeof(T), cudaMemcpyDeviceToHost));
  }

 private:
  T* ptr_ = nullptr;
  std::size_t count_;
};

}  // namespace

CudaDevice cuda_device() {
  CudaDevice device;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    device.error = cudaGetErrorString(err);
    return device;
  }
  if (count == 0) {
    device.error = "no CUDA device";
    return device;
  }
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) != cudaSuccess) {
    device.error = "cudaGetDeviceProperties failed";
    return device;
  }
  device.available = true;
  device.name = prop.name;
  return device;
}

std::vector<float> smooth_cuda(const Mesh& mesh, int iterations, float lambda,
                               const ProgressFn& progress) {
  const std::size_t n = mesh.vertex_count();
  std::vector<float> host(mesh.positions.begin(), mesh.positions.end());
  if (n == 0) return host;

  GPU_TOOL_CUDA_CHECK(cudaSetDevice(0));
  DeviceBuffer<float> a(host.size());
  DeviceBuffer<float> b(host.size());
  DeviceBuffer<int> offsets(mesh.offsets.size());
  DeviceBuffer<int> neighbors(mesh.neighbors.size());
  a.upload(host.data(), host.size());
  offsets.upload(mesh.offsets.data(), mesh.offsets.size());
  neighbors.upload(mesh.neighbors.data(), mesh.neighbors.size());

  const int block = 256;
  const int grid = static_cast<int>((n + block - 1) / block);
  // Progress (and the device sync it needs) about 50 times per run, not every iteration.
  const int stride = std::max(1, iterations / 50);
  float* in = a.get();
  float* out = b.get();
  for (int it = 0; it < iterations; ++it) {
    laplacian_step<<<grid, block>>>(in, out, offsets.get(), neighbors.get(), static_cast<int>(n),
                                    lambda);
    GPU_TOOL_CUDA_CHECK(cudaGetLastError());
    std::swap(in, out);
    const int done = it + 1;
    if (done % stride == 0 || done == iterations) {
      GPU_TOOL_CUDA_CHECK(cudaDeviceSynchronize());
      if (progress && !progress(done, iterations)) throw Cancelled();
    }
  }
  GPU_TOOL_CUDA_CHECK(cudaDeviceSynchronize());
  GPU_TOOL_CUDA_CHECK(cudaMemcpy(host.data(), in, host.size() * sizeof(float),
                                 cudaMemcpyDeviceToHost));
  return host;
}

}  // namespace gpu_tool
