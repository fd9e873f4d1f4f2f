// cpp-gpu-tool-worker: a dagmesh worker for a GPU step, mesh.smooth 1.0.0 (Laplacian smoothing
// of a noisy torus mesh), with a CUDA path and a CPU path.
//
//   cpp-gpu-tool-worker --server URL [--instance-id ID] [--name NAME] [--slots N] [--cpu-only]
//       [--token T] [--token-file PATH] [--tls-ca PEM] [--tls-client-cert PEM]
//       [--tls-client-key PEM] [--tls-server-name NAME]
//   cpp-gpu-tool-worker --selftest [--rings R] [--segments S] [--iterations N]
//
// The security flags default to DAGMESH_TOKEN, DAGMESH_TOKEN_FILE, DAGMESH_TLS_CA,
// DAGMESH_TLS_CLIENT_CERT, DAGMESH_TLS_CLIENT_KEY and DAGMESH_TLS_SERVER_NAME (TLS for an
// https:// --server).
//
// The worker carries the label gpu=true only when the CUDA path is compiled in and a device is
// present (and --cpu-only is not given).

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "dagmesh/dagmesh.hpp"
#include "mesh.hpp"
#include "smooth_cuda.hpp"

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

/// CPU (double) vs CUDA (float): the largest coordinate difference allowed, for coordinates of
/// magnitude ~1 (the README states it).
constexpr double kTolerance = 1e-4;

#ifdef GPU_TOOL_WITH_CUDA
constexpr bool kCudaBuilt = true;
#else
constexpr bool kCudaBuilt = false;
#endif

gpu_tool::CudaDevice detect_cuda() {
#ifdef GPU_TOOL_WITH_CUDA
  return gpu_tool::cuda_device();
#else
  gpu_tool::CudaDevice none;
  none.error = "the CUDA path is not compiled in (configure with -DDAGMESH_WITH_CUDA=ON)";
  return none;
#endif
}

std::vector<float> run_cuda(const gpu_tool::Mesh& mesh, int iterations, float lambda,
                            const gpu_tool::ProgressFn& progress) {
#ifdef GPU_TOOL_WITH_CUDA
  return gpu_tool::smooth_cuda(mesh, iterations, lambda, progress);
#else
  (void)mesh, (void)iterations, (void)lambda, (void)progress;
  throw std::runtime_error("the CUDA path is not compiled in");
#endif
}

double elapsed_ms(Clock::time_point since) {
  return std::chrono::duration<double, std::milli>(Clock::now() - since).count();
}

// --- inputs ------------------------------------------------------------------------------------

double number(const json& inputs, const char* name, double fallback, double min, double max) {
  auto it = inputs.find(name);
  if (it == inputs.end() || it->is_null()) return fallback;
  if (!it->is_number()) throw dagmesh::TaskError(std::string("inputs.") + name + ": not a number", false);
  const double value = it->get<double>();
  if (!(value >= min && value <= max)) {
    throw dagmesh::TaskError(std::string("inputs.") + name + ": " + it->dump() + " is outside [" +
                                 json(min).dump() + ", " + json(max).dump() + "]",
                             false);
  }
  return value;
}

int integer(const json& inputs, const char* name, int fallback, int min, int max) {
  const double value = number(inputs, name, fallback, min, max);
  if (std::trunc(value) != value) {
    throw dagmesh::TaskError(std::string("inputs.") + name + ": want a whole number", false);
  }
  return static_cast<int>(value);
}

json vec3(const std::vector<double>& v) { return json::array({v[0], v[1], v[2]}); }

template <typename T>
void bounds(const std::vector<T>& p, std::vector<double>& lo, std::vector<double>& hi) {
  lo.assign(3, INFINITY);
  hi.assign(3, -INFINITY);
  for (std::size_t i = 0; i < p.size(); ++i) {
    lo[i % 3] = std::min(lo[i % 3], static_cast<double>(p[i]));
    hi[i % 3] = std::max(hi[i % 3], static_cast<double>(p[i]));
  }
}

// --- the handler -------------------------------------------------------------------------------

json smooth(dagmesh::TaskContext& ctx, const json& inputs, bool cuda_usable,
            const std::string& device_name) {
  gpu_tool::TorusParams params;
  params.rings = integer(inputs, "rings", 64, 3, 4096);
  params.segments = integer(inputs, "segments", 128, 3, 4096);
  params.major_radius = number(inputs, "major_radius", 1.0, 1e-6, 1e6);
  params.minor_radius = number(inputs, "minor_radius", 0.35, 1e-6, 1e6);
  params.noise = number(inputs, "noise", 0.02, 0, 1e6);
  params.seed = static_cast<std::uint64_t>(number(inputs, "seed", 1, 0, 9007199254740991.0));
  const int iterations = integer(inputs, "iterations", 50, 0, 1000000);
  const double lambda = number(inputs, "lambda", 0.5, 0, 1);
  const std::string backend_wanted = inputs.value("backend", std::string("auto"));
  const bool return_positions = inputs.value("return_positions", false);
  if (backend_wanted != "auto" && backend_wanted != "cpu" && backend_wanted != "cuda") {
    throw dagmesh::TaskError("inputs.backend: want \"auto\", \"cpu\" or \"cuda\"", false);
  }
  if (backend_wanted == "cuda" && !cuda_usable) {
    // Another worker may have a GPU: let the retry policy try elsewhere.
    throw dagmesh::TaskError("inputs.backend is \"cuda\" but this worker has no usable CUDA device",
                             true);
  }
  const bool use_cuda = cuda_usable && backend_wanted != "cpu";

  ctx.progress(0, "building mesh");
  gpu_tool::Mesh mesh = gpu_tool::make_noisy_torus(params);
  const double before = gpu_tool::roughness(mesh, mesh.positions);
  ctx.info("mesh.smooth: " + std::to_string(mesh.vertex_count()) + " vertices, " +
           std::to_string(iterations) + " iterations on " + (use_cuda ? "cuda (" + device_name + ")" : "cpu"));

  // Called from the compute loop (per iteration on the CPU, every ~2% on the GPU); stops the
  // loop when the attempt is cancelled.
  const gpu_tool::ProgressFn progress = [&ctx](int done, int total) {
    ctx.progress(total == 0 ? 1.0 : static_cast<double>(done) / total,
                 "iteration " + std::to_string(done) + "/" + std::to_string(total),
                 {{"iteration", static_cast<double>(done)}});
    return !ctx.cancelled();
  };

  const auto start = Clock::now();
  json out;
  std::vector<double> lo, hi;
  try {
    if (use_cuda) {
      const auto result = run_cuda(mesh, iterations, static_cast<float>(lambda), progress);
      out["roughness_after"] = gpu_tool::roughness(mesh, result);
      out["checksum"] = gpu_tool::checksum(result);
      bounds(result, lo, hi);
      if (return_positions) out["positions"] = result;
      out["backend"] = "cuda";
      out["device"] = device_name;
    } else {
      const auto result = gpu_tool::smooth_cpu<double>(mesh, iterations, lambda, progress);
      out["roughness_after"] = gpu_tool::roughness(mesh, result);
      out["checksum"] = gpu_tool::checksum(result);
      bounds(result, lo, hi);
      if (return_positions) out["positions"] = result;
      out["backend"] = "cpu";
    }
  } catch (const gpu_tool::Cancelled&) {
    throw dagmesh::TaskError("cancelled", true);
  }
  if (iterations == 0) ctx.progress(1, "nothing to do");
  out["elapsed_ms"] = elapsed_ms(start);
  out["vertices"] = mesh.vertex_count();
  out["faces"] = mesh.face_count();
  out["iterations"] = iterations;
  out["lambda"] = lambda;
  out["roughness_before"] = before;
  out["bbox_min"] = vec3(lo);
  out["bbox_max"] = vec3(hi);
  return out;
}

// --- selftest ----------------------------------------------------------------------------------

int selftest(int rings, int segments, int iterations) {
  gpu_tool::TorusParams params;
  params.rings = rings;
  params.segments = segments;
  params.noise = 0.05;
  params.seed = 42;
  const double lambda = 0.5;
  const auto mesh = gpu_tool::make_noisy_torus(params);
  std::printf("selftest: noisy torus %dx%d (%zu vertices, %zu faces), %d iterations, lambda %.2f\n",
              rings, segments, mesh.vertex_count(), mesh.face_count(), iterations, lambda);
  std::printf("  roughness before: %.6e\n", gpu_tool::roughness(mesh, mesh.positions));

  int last_reported = 0;
  const gpu_tool::ProgressFn progress = [&last_reported](int done, int) {
    last_reported = done;
    return true;
  };

  auto start = Clock::now();
  const auto cpu = gpu_tool::smooth_cpu<double>(mesh, iterations, lambda, progress);
  const double cpu_ms = elapsed_ms(start);
  std::printf("  cpu  (double): checksum %.9f  roughness after %.6e  %.1f ms\n",
              gpu_tool::checksum(cpu), gpu_tool::roughness(mesh, cpu), cpu_ms);
  bool ok = last_reported == iterations;
  if (!ok) std::printf("  FAIL: progress stopped at %d of %d\n", last_reported, iterations);
  ok = ok && gpu_tool::roughness(mesh, cpu) < gpu_tool::roughness(mesh, mesh.positions);

  // The GPU's arithmetic (float) on the CPU: shows the float-vs-double drift without a GPU.
  start = Clock::now();
  const auto cpu_float = gpu_tool::smooth_cpu<float>(mesh, iterations, static_cast<float>(lambda), progress);
  const double float_ms = elapsed_ms(start);
  const double float_diff = gpu_tool::max_abs_diff(cpu_float, cpu);
  std::printf("  cpu  (float):  checksum %.9f  %.1f ms  max |float - double| = %.3e (tolerance %.0e) %s\n",
              gpu_tool::checksum(cpu_float), float_ms, float_diff, kTolerance,
              float_diff <= kTolerance ? "ok" : "FAIL");
  ok = ok && float_diff <= kTolerance;

  if (!kCudaBuilt) {
    std::printf("  cuda: not built (configure with -DDAGMESH_WITH_CUDA=ON and a CUDA toolkit)\n");
  } else {
    const auto device = detect_cuda();
    if (!device.available) {
      std::printf("  cuda: built, but no usable device: %s\n", device.error.c_str());
    } else {
      try {
        // Warm-up (context creation, module load) outside the timing.
        (void)run_cuda(mesh, 1, static_cast<float>(lambda), nullptr);
        start = Clock::now();
        last_reported = 0;
        const auto gpu = run_cuda(mesh, iterations, static_cast<float>(lambda), progress);
        const double gpu_ms = elapsed_ms(start);
        const double diff = gpu_tool::max_abs_diff(gpu, cpu);
        std::printf("  cuda (float, %s): checksum %.9f  %.1f ms  max |cuda - cpu| = %.3e "
                    "(tolerance %.0e) %s\n",
                    device.name.c_str(), gpu_tool::checksum(gpu), gpu_ms, diff, kTolerance,
                    diff <= kTolerance ? "ok" : "FAIL");
        ok = ok && diff <= kTolerance && last_reported == iterations;
      } catch (const std::exception& e) {
        std::printf("  cuda: FAIL: %s\n", e.what());
        ok = false;
      }
    }
  }
  std::printf("selftest %s\n", ok ? "passed" : "FAILED");
  return ok ? 0 : 1;
}

int usage(const std::string& error) {
  std::cerr << "error: " << error << "\n"
            << "usage: cpp-gpu-tool-worker --server URL [--instance-id ID] [--name NAME] "
               "[--slots N] [--cpu-only]\n"
               "           [--token T] [--token-file PATH] [--tls-ca PEM] [--tls-client-cert PEM]\n"
               "           [--tls-client-key PEM] [--tls-server-name NAME]\n"
            << "       cpp-gpu-tool-worker --selftest [--rings R] [--segments S] [--iterations N]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  dagmesh::WorkerOptions options;
  options.name = "cpp-gpu-tool";
  bool selftest_mode = false;
  bool cpu_only = false;
  bool have_server = false;
  int rings = 128, segments = 256, iterations = 200;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&](const char* flag) -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(std::string(flag) + " needs a value");
      return argv[++i];
    };
    try {
      if (arg == "--selftest") {
        selftest_mode = true;
      } else if (arg == "--cpu-only") {
        cpu_only = true;
      } else if (arg == "--server") {
        options.server = value("--server");
        have_server = true;
      } else if (arg == "--instance-id") {
        options.instance_id = value("--instance-id");
      } else if (arg == "--name") {
        options.name = value("--name");
      } else if (arg == "--slots") {
        options.slots = static_cast<std::uint32_t>(std::stoul(value("--slots")));
      } else if (arg == "--token") {
        options.token = value("--token");
      } else if (arg == "--token-file") {
        options.token_file = value("--token-file");
      } else if (arg == "--tls-ca") {
        options.tls_ca = value("--tls-ca");
      } else if (arg == "--tls-client-cert") {
        options.tls_client_cert = value("--tls-client-cert");
      } else if (arg == "--tls-client-key") {
        options.tls_client_key = value("--tls-client-key");
      } else if (arg == "--tls-server-name") {
        options.tls_server_name = value("--tls-server-name");
      } else if (arg == "--rings") {
        rings = std::stoi(value("--rings"));
      } else if (arg == "--segments") {
        segments = std::stoi(value("--segments"));
      } else if (arg == "--iterations") {
        iterations = std::stoi(value("--iterations"));
      } else if (arg == "-h" || arg == "--help") {
        usage("help");
        return 0;
      } else {
        return usage("unknown argument " + arg);
      }
    } catch (const std::exception& e) {
      return usage(e.what());
    }
  }
  if (selftest_mode) return selftest(rings, segments, iterations);
  if (!have_server) return usage("--server (or --selftest) is required");

  const auto device = cpu_only ? gpu_tool::CudaDevice{} : detect_cuda();
  const bool cuda_usable = device.available;
  if (cuda_usable) {
    options.labels["gpu"] = "true";
    std::cerr << "cpp-gpu-tool-worker: CUDA device " << device.name << ", label gpu=true\n";
  } else {
    std::cerr << "cpp-gpu-tool-worker: CPU path only ("
              << (cpu_only ? std::string("--cpu-only") : device.error) << ")\n";
  }

  std::unique_ptr<dagmesh::Worker> built;
  try {
    built = std::make_unique<dagmesh::Worker>(options);  // checks the token and TLS settings
  } catch (const std::invalid_argument& e) {
    std::cerr << "cpp-gpu-tool-worker: " << e.what() << "\n";
    return 2;
  }
  dagmesh::Worker& worker = *built;
  const std::string device_name = device.name;
  worker.task("mesh.smooth", "1.0.0",
              [cuda_usable, device_name](dagmesh::TaskContext& ctx, const json& inputs) {
                return smooth(ctx, inputs, cuda_usable, device_name);
              });
  const int code = worker.run();
  if (code != 0) std::cerr << "cpp-gpu-tool-worker: " << worker.last_error() << "\n";
  return code;
}
