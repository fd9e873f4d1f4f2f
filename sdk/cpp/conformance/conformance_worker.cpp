// dagmesh_conformance_worker: the cross-language conformance worker (same contract in Rust,
// Python and C++).
//
//   dagmesh_conformance_worker --server URL --instance-id ID [--slots N] [--name NAME]
//       [--token T] [--token-file PATH] [--tls-ca PEM] [--tls-client-cert PEM]
//       [--tls-client-key PEM] [--tls-server-name NAME]
//
// The security flags default to DAGMESH_TOKEN, DAGMESH_TOKEN_FILE, DAGMESH_TLS_CA,
// DAGMESH_TLS_CLIENT_CERT, DAGMESH_TLS_CLIENT_KEY and DAGMESH_TLS_SERVER_NAME; TLS is used for
// an https:// --server. Bad settings exit 2 with the reason; so does a token the executor
// refuses (UNAUTHENTICATED, PERMISSION_DENIED).
//
// Task types, each version 1.0.0:
//   conformance.echo         returns its inputs
//   conformance.progress     {"steps": n}: progress k/n "step k" for k = 1..n, 60 ms apart;
//                            returns {"done": n}
//   conformance.wait_cancel  waits until cancelled (at most 60 s); then prints
//                            "EVENT cancelled <task_id> <attempt>" and fails retryable
//   conformance.sleep        {"ms": m, "first_attempt_ms": f?}: sleeps f ms on attempt 1 when f
//                            is given, else m ms, ignoring cancellation;
//                            returns {"slept": ms, "attempt": attempt}
//   conformance.big          {"bytes": n}: returns {"blob": n times "x"}
// Every handler first prints "EVENT started <task_id> <attempt>". EVENT lines go to stdout,
// flushed; logs go to stderr. Exits 0 after a SIGTERM drain.

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

#include "dagmesh/dagmesh.hpp"

namespace {

using nlohmann::json;

std::mutex stdout_mu;

void event(const char* what, const dagmesh::TaskContext& ctx) {
  std::lock_guard<std::mutex> lock(stdout_mu);
  std::printf("EVENT %s %s %u\n", what, ctx.task_id().c_str(), ctx.attempt());
  std::fflush(stdout);
}

std::int64_t int_input(const json& inputs, const char* name) {
  auto it = inputs.find(name);
  if (it == inputs.end() || !it->is_number()) {
    throw dagmesh::TaskError(std::string("inputs.") + name + ": a number is required", false);
  }
  const double value = it->get<double>();
  if (value < 0) throw dagmesh::TaskError(std::string("inputs.") + name + ": must be >= 0", false);
  return static_cast<std::int64_t>(value);
}

const char* const kUsage =
    "usage: dagmesh_conformance_worker --server URL --instance-id ID [--slots N] [--name NAME]\n"
    "           [--token T] [--token-file PATH] [--tls-ca PEM] [--tls-client-cert PEM]\n"
    "           [--tls-client-key PEM] [--tls-server-name NAME]\n"
    "  (security flags default to DAGMESH_TOKEN, DAGMESH_TOKEN_FILE, DAGMESH_TLS_CA,\n"
    "   DAGMESH_TLS_CLIENT_CERT, DAGMESH_TLS_CLIENT_KEY, DAGMESH_TLS_SERVER_NAME)\n";

int usage(const char* error) {
  std::cerr << "error: " << error << "\n" << kUsage;
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  dagmesh::WorkerOptions options;
  options.name = "conformance";
  bool have_server = false;
  bool have_instance = false;
  const std::map<std::string, std::string dagmesh::WorkerOptions::*> security = {
      {"--token", &dagmesh::WorkerOptions::token},
      {"--token-file", &dagmesh::WorkerOptions::token_file},
      {"--tls-ca", &dagmesh::WorkerOptions::tls_ca},
      {"--tls-client-cert", &dagmesh::WorkerOptions::tls_client_cert},
      {"--tls-client-key", &dagmesh::WorkerOptions::tls_client_key},
      {"--tls-server-name", &dagmesh::WorkerOptions::tls_server_name}};
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    const auto eq = arg.find('=');
    if (arg.rfind("--", 0) == 0 && eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else if (arg == "--server" || arg == "--instance-id" || arg == "--slots" || arg == "--name" ||
               security.count(arg) > 0) {
      if (i + 1 >= argc) return usage((arg + " needs a value").c_str());
      value = argv[++i];
    } else if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      return 0;
    } else {
      return usage(("unknown argument " + arg).c_str());
    }
    if (arg == "--server") {
      options.server = value;
      have_server = true;
    } else if (arg == "--instance-id") {
      options.instance_id = value;
      have_instance = true;
    } else if (arg == "--slots") {
      char* end = nullptr;
      const long slots = std::strtol(value.c_str(), &end, 10);
      if (end == value.c_str() || *end != '\0' || slots < 1) return usage("--slots: want N >= 1");
      options.slots = static_cast<std::uint32_t>(slots);
    } else if (arg == "--name") {
      options.name = value;
    } else if (auto it = security.find(arg); it != security.end()) {
      options.*(it->second) = value;
    } else {
      return usage(("unknown argument " + arg).c_str());
    }
  }
  if (!have_server) return usage("--server is required");
  if (!have_instance || options.instance_id.empty()) return usage("--instance-id is required");

  std::unique_ptr<dagmesh::Worker> built;
  try {
    built = std::make_unique<dagmesh::Worker>(options);
  } catch (const std::invalid_argument& e) {
    std::cerr << "dagmesh_conformance_worker: " << e.what() << "\n";
    return 2;
  }
  dagmesh::Worker& worker = *built;

  worker.task("conformance.echo", "1.0.0", [](dagmesh::TaskContext& ctx, const json& inputs) {
    event("started", ctx);
    return inputs;
  });

  worker.task("conformance.progress", "1.0.0", [](dagmesh::TaskContext& ctx, const json& inputs) {
    event("started", ctx);
    const std::int64_t steps = int_input(inputs, "steps");
    for (std::int64_t k = 1; k <= steps; ++k) {
      ctx.progress(static_cast<double>(k) / static_cast<double>(steps), "step " + std::to_string(k));
      if (k < steps) std::this_thread::sleep_for(std::chrono::milliseconds(60));
    }
    return json{{"done", steps}};
  });

  worker.task("conformance.wait_cancel", "1.0.0",
              [](dagmesh::TaskContext& ctx, const json&) -> json {
                event("started", ctx);
                if (ctx.wait_cancelled(std::chrono::seconds(60))) {
                  event("cancelled", ctx);
                  throw dagmesh::TaskError("cancelled", true);
                }
                throw dagmesh::TaskError("not cancelled within 60 s", false);
              });

  worker.task("conformance.sleep", "1.0.0", [](dagmesh::TaskContext& ctx, const json& inputs) {
    event("started", ctx);
    std::int64_t ms = 0;
    if (ctx.attempt() == 1 && inputs.contains("first_attempt_ms") &&
        !inputs.at("first_attempt_ms").is_null()) {
      ms = int_input(inputs, "first_attempt_ms");
    } else {
      ms = int_input(inputs, "ms");
    }
    // Deliberately ignores cancellation.
    std::this_thread::sleep_for(std::chrono::milliseconds(ms));
    return json{{"slept", ms}, {"attempt", ctx.attempt()}};
  });

  worker.task("conformance.big", "1.0.0", [](dagmesh::TaskContext& ctx, const json& inputs) {
    event("started", ctx);
    const std::int64_t bytes = int_input(inputs, "bytes");
    return json{{"blob", std::string(static_cast<std::size_t>(bytes), 'x')}};
  });

  const int code = worker.run();
  if (code != 0) std::cerr << "dagmesh_conformance_worker: " << worker.last_error() << "\n";
  return code;
}
