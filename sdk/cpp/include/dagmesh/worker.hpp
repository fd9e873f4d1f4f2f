#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

#include "dagmesh/task_context.hpp"
#include "dagmesh/task_error.hpp"

namespace dagmesh {

/// SDK version, sent as Hello.sdk_version.
const char* sdk_version() noexcept;

/// A task handler: gets the attempt's context and its inputs (a JSON object), returns its
/// outputs (a JSON object; anything else is wrapped as {"value": ...}). Throw TaskError to
/// fail the attempt; any other exception fails it as retryable with `what()`.
using Handler = std::function<nlohmann::json(TaskContext& ctx, const nlohmann::json& inputs)>;

struct WorkerOptions {
  /// Executor address: "http://host:port" or "host:port" (plaintext), "https://host:port"
  /// (TLS: the server certificate is verified against `tls_ca`, default the system roots).
  std::string server = "http://127.0.0.1:7070";
  /// Logical worker name (the pool), Hello.worker_name. Default: the executable's name.
  std::string name;
  /// Unique id of this process, kept across reconnects so the executor hands back the tasks it
  /// held. Default: name + "-" + 12 random hex digits.
  std::string instance_id;
  /// Labels matched against StepSpec.labels, e.g. {"gpu", "true"}.
  std::map<std::string, std::string> labels;
  /// Task slots held at once (Hello.slots); handlers run on a pool of this many threads.
  std::uint32_t slots = 1;
  /// Bounds of the reconnect backoff (exponential, each delay jittered down to half).
  std::chrono::milliseconds reconnect_initial{100};
  std::chrono::milliseconds reconnect_max{5000};

  // Security (the same settings and environment variables as the CLI and the other SDKs). Each
  // one left empty falls back to its environment variable; an option set here wins over the
  // variable. Files are read when the Worker is constructed.

  /// Bearer token, sent as `authorization: Bearer <token>` on every stream. Empty:
  /// DAGMESH_TOKEN. May go over plaintext (loopback use).
  std::string token;
  /// File holding the token (surrounding whitespace trimmed), used when no token is given.
  /// Empty: DAGMESH_TOKEN_FILE.
  std::string token_file;
  /// PEM file of the CA(s) that signed the server certificate. Empty: DAGMESH_TLS_CA, else the
  /// system roots.
  std::string tls_ca;
  /// PEM client certificate chain for mTLS (needs `tls_client_key`). Empty:
  /// DAGMESH_TLS_CLIENT_CERT.
  std::string tls_client_cert;
  /// PEM private key of the client certificate (needs `tls_client_cert`). Empty:
  /// DAGMESH_TLS_CLIENT_KEY.
  std::string tls_client_key;
  /// Name to verify in the server certificate instead of the URL's host. Empty:
  /// DAGMESH_TLS_SERVER_NAME.
  std::string tls_server_name;
};

/// What a worker dials with once the options and their environment variables are resolved
/// (see resolve_connection()).
struct ConnectionSettings {
  /// gRPC target, e.g. "127.0.0.1:7070" (the URL without scheme and path).
  std::string target;
  /// The URL is https://.
  bool tls = false;
  /// The bearer token; empty: none is sent.
  std::string token;
  /// Where the token came from: "token", "DAGMESH_TOKEN", "token_file <path>",
  /// "DAGMESH_TOKEN_FILE <path>"; empty without a token.
  std::string token_source;
  /// PEM contents (not paths); empty root certs mean the system roots.
  std::string pem_root_certs;
  std::string pem_cert_chain;
  std::string pem_private_key;
  std::string tls_server_name;
};

/// Resolves `options` against the environment (DAGMESH_TOKEN, DAGMESH_TOKEN_FILE,
/// DAGMESH_TLS_CA, DAGMESH_TLS_CLIENT_CERT, DAGMESH_TLS_CLIENT_KEY, DAGMESH_TLS_SERVER_NAME) and
/// reads the files. Throws std::invalid_argument, naming the setting (or variable) and the file,
/// for a TLS setting with a server URL that is not https://, a client certificate without its
/// key (or the reverse), an unreadable or empty file, a file without PEM data, or a token that
/// cannot go in a gRPC header. The Worker constructor calls it.
ConnectionSettings resolve_connection(const WorkerOptions& options);

/// A snapshot of the worker's state.
struct WorkerState {
  /// A stream is open and welcomed.
  bool connected = false;
  /// Welcome.session_id of the current stream; empty when not connected.
  std::string session_id;
  /// The worker was told to stop (drain(), a signal): it takes no new work and run() returns
  /// once every result is recorded.
  bool draining = false;
  /// The executor of the current stream sent Drain (it is going away): no new work is taken
  /// from it, and once nothing is in flight the worker reconnects and resumes.
  bool executor_draining = false;
  /// Handlers still running.
  std::size_t running = 0;
  /// Finished tasks whose results the executor has not yet Recorded.
  std::size_t unacknowledged = 0;
  /// Streams that got a Welcome so far, the current one included.
  std::uint64_t sessions = 0;
  /// Welcome.max_payload_bytes of the last session (0 before the first).
  std::uint64_t max_payload_bytes = 0;
};

/// Exit codes of Worker::run().
enum RunResult : int {
  /// Drained: every result was recorded (or the drain began with nothing in flight).
  kDrained = 0,
  /// abort() (or a second SIGTERM/SIGINT) stopped the worker before every result was recorded.
  kAborted = 1,
  /// The executor refused the Hello (INVALID_ARGUMENT) or the worker's credentials
  /// (UNAUTHENTICATED: missing, invalid, expired or revoked token; PERMISSION_DENIED: the token
  /// lacks the scope, e.g. a task type outside its patterns), or the worker is misconfigured.
  kRejected = 2,
};

/// A worker: registers task handlers, dials the run-executor over WorkerService.Connect and
/// runs what it assigns, following the protocol at the top of proto/dagmesh/v1/worker.proto.
///
///   dagmesh::WorkerOptions options;
///   options.server = "http://127.0.0.1:7070";
///   options.name = "mesher";
///   dagmesh::Worker worker(options);
///   worker.task("mesh.smooth", "1.0.0", [](dagmesh::TaskContext& ctx, const nlohmann::json& in) {
///     ctx.progress(0.5, "halfway");
///     return nlohmann::json{{"ok", true}};
///   });
///   return worker.run();  // until SIGTERM/SIGINT (drain)
///
/// Drain from the executor means the executor is going away (a restart, a rollout): the worker
/// takes no new work from that stream, finishes what runs, and once every result is Recorded
/// (or the executor closed the stream first, leaving results to send again) closes the stream
/// and reconnects, to resume with the next executor. Only the worker's own stop (drain(),
/// SIGTERM/SIGINT, abort()) makes run() return.
class Worker {
 public:
  /// Throws std::invalid_argument for bad security settings (see resolve_connection()).
  explicit Worker(WorkerOptions options = {});
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  /// Registers the handler of task type `name` at `version` (semver, e.g. "1.3.0"). Throws
  /// std::invalid_argument for an empty name, a bad version or a duplicate, and
  /// std::logic_error once run() has started.
  Worker& task(const std::string& name, const std::string& version, Handler handler);

  /// Runs until drained and returns a RunResult. With `handle_signals`, the first SIGTERM or
  /// SIGINT starts a drain and a second one aborts (previous handlers are restored on return).
  /// Reconnects with exponential backoff and jitter whenever the stream breaks or the executor
  /// drained it; only an INVALID_ARGUMENT answer to the Hello, or an UNAUTHENTICATED or
  /// PERMISSION_DENIED end of a stream, stops it (kRejected, the server's message at ERROR and
  /// in last_error()). Call it once.
  int run(bool handle_signals = true);

  /// Starts a drain (thread-safe, any time, even before run()): Draining is sent, new
  /// assignments are refused, running tasks finish, run() returns once every result is Recorded.
  void drain();
  /// Stops at once: running handlers are told cancelled(), unrecorded results are dropped
  /// (the executor re-runs those tasks after the lease), run() returns kAborted. Handlers
  /// still running are joined by the destructor.
  void abort();

  WorkerState state() const;
  /// Waits until `predicate(state())` holds or `timeout` passes; returns whether it held.
  bool wait_for(const std::function<bool(const WorkerState&)>& predicate,
                std::chrono::milliseconds timeout) const;

  const std::string& name() const noexcept;
  const std::string& instance_id() const noexcept;
  /// Why run() returned kRejected or kAborted; empty otherwise.
  std::string last_error() const;

  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace dagmesh
