#include "mesh.hpp"

#include <algorithm>
#include <cmath>

namespace gpu_tool {

namespace {

constexpr double kPi = 3.14159265358979323846;

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

/// Uniform in [-1, 1), a pure function of (seed, index).
double noise_at(std::uint64_t seed, std::uint64_t index) {
  const std::uint64_t bits = splitmix64(seed * 0x100000001b3ull ^ splitmix64(index));
  return static_cast<double>(bits >> 11) * (2.0 / 9007199254740992.0) - 1.0;
}

}  // namespace

Mesh make_noisy_torus(const TorusParams& p) {
  if (p.rings < 3 || p.segments < 3) throw std::invalid_argument("rings and segments must be >= 3");
  Mesh mesh;
  const int rings = p.rings;
  const int segments = p.segments;
  mesh.positions.resize(static_cast<std::size_t>(rings) * segments * 3);
  for (int i = 0; i < rings; ++i) {
    const double v = 2 * kPi * i / rings;
    for (int j = 0; j < segments; ++j) {
      const double u = 2 * kPi * j / segments;
      const std::size_t index = static_cast<std::size_t>(i) * segments + j;
      const double ring = p.major_radius + p.minor_radius * std::cos(v);
      const double xyz[3] = {ring * std::cos(u), ring * std::sin(u), p.minor_radius * std::sin(v)};
      for (int k = 0; k < 3; ++k) {
        mesh.positions[index * 3 + k] = xyz[k] + p.noise * noise_at(p.seed, index * 3 + k);
      }
    }
  }
  auto at = [&](int i, int j) {
    return static_cast<std::int32_t>(((i + rings) % rings) * segments + ((j + segments) % segments));
  };
  mesh.faces.reserve(static_cast<std::size_t>(rings) * segments * 6);
  for (int i = 0; i < rings; ++i) {
    for (int j = 0; j < segments; ++j) {
      const std::int32_t a = at(i, j), b = at(i, j + 1), c = at(i + 1, j + 1), d = at(i + 1, j);
      mesh.faces.insert(mesh.faces.end(), {a, b, c, a, c, d});
    }
  }
  build_adjacency(mesh);
  return mesh;
}

void build_adjacency(Mesh& mesh) {
  const std::size_t n = mesh.vertex_count();
  std::vector<std::vector<std::int32_t>> adjacent(n);
  for (std::size_t f = 0; f < mesh.face_count(); ++f) {
    for (int e = 0; e < 3; ++e) {
      const std::int32_t a = mesh.faces[f * 3 + e];
      const std::int32_t b = mesh.faces[f * 3 + (e + 1) % 3];
      adjacent[a].push_back(b);
      adjacent[b].push_back(a);
    }
  }
  mesh.offsets.assign(n + 1, 0);
  mesh.neighbors.clear();
  for (std::size_t v = 0; v < n; ++v) {
    auto& list = adjacent[v];
    std::sort(list.begin(), list.end());
    list.erase(std::unique(list.begin(), list.end()), list.end());
    mesh.neighbors.insert(mesh.neighbors.end(), list.begin(), list.end());
    mesh.offsets[v + 1] = static_cast<std::int32_t>(mesh.neighbors.size());
  }
}

template <typename T>
std::vector<T> smooth_cpu(const Mesh& mesh, int iterations, T lambda, const ProgressFn& progress) {
  const std::size_t n = mesh.vertex_count();
  std::vector<T> current(mesh.positions.begin(), mesh.positions.end());
  std::vector<T> next(current.size());
  for (int it = 0; it < iterations; ++it) {
    for (std::size_t v = 0; v < n; ++v) {
      const std::int32_t begin = mesh.offsets[v];
      const std::int32_t end = mesh.offsets[v + 1];
      if (begin == end) {
        for (int k = 0; k < 3; ++k) next[v * 3 + k] = current[v * 3 + k];
        continue;
      }
      // Same operations, in the same order, as the CUDA kernel.
      T sum[3] = {0, 0, 0};
      for (std::int32_t e = begin; e < end; ++e) {
        const std::size_t u = static_cast<std::size_t>(mesh.neighbors[e]);
        for (int k = 0; k < 3; ++k) sum[k] += current[u * 3 + k];
      }
      const T inv = T(1) / static_cast<T>(end - begin);
      for (int k = 0; k < 3; ++k) {
        const T p = current[v * 3 + k];
        next[v * 3 + k] = p + lambda * (sum[k] * inv - p);
      }
    }
    current.swap(next);
    if (progress && !progress(it + 1, iterations)) throw Cancelled();
  }
  return current;
}

template std::vector<double> smooth_cpu<double>(const Mesh&, int, double, const ProgressFn&);
template std::vector<float> smooth_cpu<float>(const Mesh&, int, float, const ProgressFn&);

template <typename T>
double roughness(const Mesh& mesh, const std::vector<T>& positions) {
  const std::size_t n = mesh.vertex_count();
  if (n == 0) return 0;
  double total = 0;
  for (std::size_t v = 0; v < n; ++v) {
    const std::int32_t begin = mesh.offsets[v];
    const std::int32_t end = mesh.offsets[v + 1];
    if (begin == end) continue;
    double d2 = 0;
    for (int k = 0; k < 3; ++k) {
      double mean = 0;
      for (std::int32_t e = begin; e < end; ++e) mean += positions[mesh.neighbors[e] * 3 + k];
      mean /= (end - begin);
      const double d = positions[v * 3 + k] - mean;
      d2 += d * d;
    }
    total += std::sqrt(d2);
  }
  return total / static_cast<double>(n);
}

template double roughness<double>(const Mesh&, const std::vector<double>&);
template double roughness<float>(const Mesh&, const std::vector<float>&);

template <typename T>
double checksum(const std::vector<T>& positions) {
  double sum = 0;
  for (std::size_t i = 0; i < positions.size(); ++i) {
    sum += static_cast<double>(positions[i]) * static_cast<double>(i % 13 + 1);
  }
  return sum;
}

template double checksum<double>(const std::vector<double>&);
template double checksum<float>(const std::vector<float>&);

}  // namespace gpu_tool
