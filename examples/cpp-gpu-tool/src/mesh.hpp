#pragma once

// A triangle mesh with vertex adjacency in CSR form, and Laplacian smoothing on the CPU.
// The CUDA path (smooth_cuda.cu) runs the same update, one thread per vertex.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

namespace gpu_tool {

struct TorusParams {
  int rings = 64;           // vertices around the tube (minor circle)
  int segments = 128;       // vertices around the ring (major circle)
  double major_radius = 1.0;
  double minor_radius = 0.35;
  double noise = 0.02;      // amplitude of the per-coordinate noise
  std::uint64_t seed = 1;
};

struct Mesh {
  std::vector<double> positions;       // x, y, z per vertex
  std::vector<std::int32_t> faces;     // 3 vertex indices per triangle
  std::vector<std::int32_t> offsets;   // CSR: neighbors of v are neighbors[offsets[v]..offsets[v+1])
  std::vector<std::int32_t> neighbors;

  std::size_t vertex_count() const { return positions.size() / 3; }
  std::size_t face_count() const { return faces.size() / 3; }
};

/// Called from the compute loop after `done` of `total` iterations; return false to stop.
using ProgressFn = std::function<bool(int done, int total)>;

/// Thrown by the smoothing loops when the progress callback asks them to stop.
struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("cancelled") {}
};

/// A torus triangulated as a rings x segments grid (two triangles per quad), every coordinate
/// moved by noise * u, u uniform in [-1, 1) from a seeded counter-based generator (the same mesh
/// on every platform).
Mesh make_noisy_torus(const TorusParams& params);

/// Fills offsets/neighbors from faces: each vertex's distinct neighbors, in ascending order.
void build_adjacency(Mesh& mesh);

/// Jacobi Laplacian smoothing: every iteration moves each vertex to
///   p + lambda * (mean of its neighbors - p)
/// using the previous iteration's positions. T is the accumulation type (double for the CPU
/// path; float reproduces the CUDA kernel's arithmetic).
template <typename T>
std::vector<T> smooth_cpu(const Mesh& mesh, int iterations, T lambda, const ProgressFn& progress);

extern template std::vector<double> smooth_cpu<double>(const Mesh&, int, double, const ProgressFn&);
extern template std::vector<float> smooth_cpu<float>(const Mesh&, int, float, const ProgressFn&);

/// Mean distance between a vertex and the mean of its neighbors: the noise smoothing removes.
template <typename T>
double roughness(const Mesh& mesh, const std::vector<T>& positions);

/// A position-weighted sum of the coordinates, to compare runs at a glance.
template <typename T>
double checksum(const std::vector<T>& positions);

template <typename A, typename B>
double max_abs_diff(const std::vector<A>& a, const std::vector<B>& b) {
  if (a.size() != b.size()) throw std::invalid_argument("max_abs_diff: sizes differ");
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    const double d = static_cast<double>(a[i]) - static_cast<double>(b[i]);
    worst = std::max(worst, d < 0 ? -d : d);
  }
  return worst;
}

}  // namespace gpu_tool
