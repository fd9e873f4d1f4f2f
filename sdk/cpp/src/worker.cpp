// The worker: options, registry, signal handling, and the driver that owns the protocol state.
//
// Threads:
//  - the driver (the thread that calls Worker::run) owns every piece of protocol state: the
//    task table, the current session, the drain. It is the only thread that writes to the
//    stream (under the session's writer mutex, which the reader takes only to call Finish).
//  - one reader thread per session opens the call, writes Hello, then reads server messages
//    into the driver's event queue until the stream ends, and reports the final status.
//  - a pool of `slots` threads runs handlers; a finished handler posts its result (Completed or
//    Failed, payload size already checked) to the event queue.
//  - with run(true), a watcher thread turns SIGTERM/SIGINT (a byte on a self-pipe written by
//    the async-signal-safe handler) into drain() and, the second time, abort().
// Handlers never touch the table; progress and logs land in the TaskContext and only wake the
// driver, which forwards them at most every 50 ms (progress) and 100 ms (logs).

#include "dagmesh/worker.hpp"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <regex>
#include <stdexcept>
#include <thread>
#include <utility>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "context_access.hpp"
#include "dagmesh/json.hpp"
#include "dagmesh/v1/worker.grpc.pb.h"
#include "log.hpp"

#ifndef DAGMESH_SDK_VERSION
#define DAGMESH_SDK_VERSION "0.0.0"
#endif

namespace dagmesh {

const char* sdk_version() noexcept { return DAGMESH_SDK_VERSION; }

namespace {

namespace v1 = ::dagmesh::v1;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using TaskKey = std::pair<std::string, std::uint32_t>;

/// Hello to Welcome. An executor that accepts the connection but never answers is as good as
/// down.
constexpr milliseconds kHandshakeTimeout{15000};
/// After a drain, how long to wait for the executor to close its side of the stream.
constexpr milliseconds kCloseGrace{2000};
constexpr milliseconds kDefaultHeartbeat{5000};
/// Progress is for people watching; more often than this only costs the executor writes.
constexpr milliseconds kProgressMinInterval{50};
constexpr milliseconds kLogFlushInterval{100};

const char* code_name(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: return "UNKNOWN_CODE";
  }
}

std::string key_text(const TaskKey& key) {
  return key.first + "#" + std::to_string(key.second);
}

// " trace_id=<32 hex>", appended to log lines about an attempt whose Assign carried a valid
// traceparent, so the SDK's lines correlate with the run's trace; "" otherwise. At the end, so
// the lines still start as before ("task <task_id>#<attempt> completed ...").
std::string trace_text(const std::string& trace_id) {
  return trace_id.empty() ? std::string() : " trace_id=" + trace_id;
}
std::string trace_text(const TaskContext* ctx) {
  return ctx == nullptr ? std::string() : trace_text(ctx->trace_id());
}

// ---------------------------------------------------------------------------------------------
// Event queue: everything that changes the driver's state arrives here.

struct Event {
  enum class Kind { Server, StreamEnded, Finished };
  Kind kind = Kind::Server;
  std::uint64_t session = 0;
  std::shared_ptr<v1::ServerMessage> server;
  grpc::Status status;
  TaskKey key;
  std::shared_ptr<v1::WorkerMessage> result;
};

class EventQueue {
 public:
  void push(Event event) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      events_.push_back(std::move(event));
    }
    cv_.notify_one();
  }

  /// Something changed outside the queue (progress, logs, drain, abort): look again.
  void wake() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      woken_ = true;
    }
    cv_.notify_one();
  }

  /// Waits until there is an event or a wake, or `deadline` passes; returns the events.
  std::deque<Event> wait_until(Clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_until(lock, deadline, [this] { return woken_ || !events_.empty(); });
    woken_ = false;
    std::deque<Event> taken;
    taken.swap(events_);
    return taken;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Event> events_;
  bool woken_ = false;
};

// ---------------------------------------------------------------------------------------------
// Handler threads.

class ThreadPool {
 public:
  explicit ThreadPool(std::size_t threads) {
    for (std::size_t i = 0; i < threads; ++i) {
      threads_.emplace_back([this] { loop(); });
    }
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      jobs_.clear();  // not started: nobody waits for them any more
    }
    cv_.notify_all();
    for (auto& thread : threads_) thread.join();
  }

  void submit(std::function<void()> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      jobs_.push_back(std::move(job));
    }
    cv_.notify_one();
  }

 private:
  void loop() {
    for (;;) {
      std::function<void()> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !jobs_.empty(); });
        if (jobs_.empty()) return;
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  std::vector<std::thread> threads_;
  bool stop_ = false;
};

// ---------------------------------------------------------------------------------------------
// Exponential backoff with jitter: doubles from `initial` up to `max`; each delay is drawn from
// [d/2, d] so that workers cut off by the same executor restart do not reconnect in lockstep.

class Backoff {
 public:
  Backoff(milliseconds initial, milliseconds max)
      : initial_(std::max(initial, milliseconds(1))),
        max_(std::max(max, initial_)),
        next_(initial_),
        rng_(std::random_device{}()) {}

  milliseconds next_delay() {
    const milliseconds base = next_;
    next_ = std::min(base * 2, max_);
    std::uniform_real_distribution<double> jitter(0.5, 1.0);
    return milliseconds(static_cast<std::int64_t>(static_cast<double>(base.count()) * jitter(rng_)));
  }

  void reset() { next_ = initial_; }

 private:
  milliseconds initial_;
  milliseconds max_;
  milliseconds next_;
  std::mt19937_64 rng_;
};

// ---------------------------------------------------------------------------------------------
// One stream (session): the call, and the thread that reads it.

struct Session {
  using Stream = grpc::ClientReaderWriter<v1::WorkerMessage, v1::ServerMessage>;

  std::uint64_t id = 0;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<v1::WorkerService::Stub> stub;
  grpc::ClientContext context;
  /// Guards `stream` writes, WritesDone and Finish.
  std::mutex write_mu;
  std::unique_ptr<Stream> stream;
  bool finished = false;
  std::thread reader;
};

void session_main(Session* session, v1::WorkerMessage hello, std::shared_ptr<EventQueue> queue) {
  auto stream = session->stub->Connect(&session->context);
  {
    std::lock_guard<std::mutex> lock(session->write_mu);
    session->stream = std::move(stream);
    // A failed write shows up as the end of the stream below, with the server's status.
    session->stream->Write(hello);
  }
  for (;;) {
    auto message = std::make_shared<v1::ServerMessage>();
    if (!session->stream->Read(message.get())) break;
    Event event;
    event.kind = Event::Kind::Server;
    event.session = session->id;
    event.server = std::move(message);
    queue->push(std::move(event));
  }
  Event event;
  event.kind = Event::Kind::StreamEnded;
  event.session = session->id;
  {
    std::lock_guard<std::mutex> lock(session->write_mu);
    event.status = session->stream->Finish();
    session->finished = true;
  }
  queue->push(std::move(event));
}

/// The URL without scheme and path: "https://host:port/x" -> "host:port".
std::string target_of(std::string url) {
  for (const char* scheme : {"http://", "https://", "grpc://"}) {
    const std::size_t n = std::strlen(scheme);
    if (url.rfind(scheme, 0) == 0) {
      url = url.substr(n);
      break;
    }
  }
  if (url.rfind("unix:", 0) != 0) {
    const auto slash = url.find('/');
    if (slash != std::string::npos) url = url.substr(0, slash);
  }
  return url;
}

/// A setting's value and what to call it in messages: the WorkerOptions field when set there,
/// else the environment variable it came from.
struct Setting {
  std::string value;
  std::string name;
  bool set() const { return !value.empty(); }
};

Setting pick(const std::string& option, const char* field, const char* variable) {
  if (!option.empty()) return {option, field};
  const char* value = std::getenv(variable);
  if (value != nullptr && *value != '\0') return {value, variable};
  return {};
}

/// PEM files and tokens are small; a bigger file is a mistake (a wrong path).
constexpr std::size_t kMaxSettingFile = 1 << 20;

std::string read_setting_file(const Setting& setting) {
  const std::string where = setting.name + " file " + setting.value;
  const int fd = ::open(setting.value.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::invalid_argument("cannot read " + where + ": " + std::strerror(errno));
  std::string content;
  char buf[8192];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      const int error = errno;
      ::close(fd);
      throw std::invalid_argument("cannot read " + where + ": " + std::strerror(error));
    }
    if (n == 0) break;
    content.append(buf, static_cast<std::size_t>(n));
    if (content.size() > kMaxSettingFile) {
      ::close(fd);
      throw std::invalid_argument("cannot read " + where + ": larger than " +
                                  std::to_string(kMaxSettingFile) + " bytes");
    }
  }
  ::close(fd);
  return content;
}

std::string trim(const std::string& text) {
  const char* space = " \t\r\n\v\f";
  const auto first = text.find_first_not_of(space);
  if (first == std::string::npos) return std::string();
  const auto last = text.find_last_not_of(space);
  return text.substr(first, last - first + 1);
}

std::string read_pem(const Setting& setting, const char* marker, const char* what) {
  std::string pem = read_setting_file(setting);
  if (pem.find(marker) == std::string::npos) {
    throw std::invalid_argument(setting.name + " file " + setting.value + " holds no PEM " + what +
                                " (no \"" + marker + "\" line)");
  }
  return pem;
}

struct ConnectHint {
  const char* text = nullptr;
  /// Surely a setting to fix (a failed certificate check), not an executor that is away.
  bool error = false;
};

/// What to check when a stream cannot be opened for a reason that looks like the TLS settings
/// (gRPC's words for a failed handshake).
ConnectHint connect_hint(const ConnectionSettings& connection, const std::string& reason) {
  const auto has = [&reason](const char* part) { return reason.find(part) != std::string::npos; };
  // A peer that hangs up during the handshake (gRPC's C++ server says "Socket closed", a
  // rustls one "Endpoint read failed").
  const bool hung_up = has("Socket closed") || has("Endpoint read failed");
  if (!connection.tls) {
    if (hung_up) return {"if the server speaks TLS, use an https:// URL", false};
    return {};
  }
  if (has("Peer name") || has("certificate verify failed") || has("andshake") ||
      has("CERTIFICATE")) {
    return {"TLS: the server certificate is not trusted or does not hold the server's name; "
            "check tls_ca (DAGMESH_TLS_CA) and tls_server_name (DAGMESH_TLS_SERVER_NAME)",
            true};
  }
  if (hung_up && connection.pem_cert_chain.empty()) {
    return {"a TLS server that requires a client certificate closes the connection like this; "
            "check tls_client_cert (DAGMESH_TLS_CLIENT_CERT) and tls_client_key "
            "(DAGMESH_TLS_CLIENT_KEY)",
            false};
  }
  return {};
}

const char* fatal_stream_code(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::UNAUTHENTICATED:
      return "the executor refused the worker's credentials";
    case grpc::StatusCode::PERMISSION_DENIED:
      return "the executor denied the worker";
    default:
      return nullptr;
  }
}

bool valid_semver(const std::string& version) {
  static const std::regex pattern(
      R"(^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*))"
      R"((-(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(\.(0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*)?)"
      R"((\+[0-9a-zA-Z-]+(\.[0-9a-zA-Z-]+)*)?$)");
  return std::regex_match(version, pattern);
}

std::string default_name() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  if (n > 0) {
    std::string path(buf, static_cast<std::size_t>(n));
    const auto slash = path.rfind('/');
    std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
    if (!base.empty()) return base;
  }
  return "worker";
}

std::string random_suffix() {
  std::random_device rd;
  std::mt19937_64 rng((static_cast<std::uint64_t>(rd()) << 32) ^ rd());
  static const char* hex = "0123456789abcdef";
  std::string suffix;
  for (int i = 0; i < 12; ++i) suffix.push_back(hex[rng() % 16]);
  return suffix;
}

std::shared_ptr<v1::WorkerMessage> failed_message(const TaskKey& key, const std::string& error,
                                                  bool retryable) {
  auto message = std::make_shared<v1::WorkerMessage>();
  auto* failed = message->mutable_failed();
  failed->set_task_id(key.first);
  failed->set_attempt(key.second);
  failed->set_error(error);
  failed->set_retryable(retryable);
  return message;
}

v1::WorkerMessage started_message(const TaskKey& key) {
  v1::WorkerMessage message;
  message.mutable_started()->set_task_id(key.first);
  message.mutable_started()->set_attempt(key.second);
  return message;
}

// ---------------------------------------------------------------------------------------------
// SIGTERM/SIGINT -> self-pipe -> watcher thread. Only one run() at a time owns the signals.

std::atomic<int> g_signal_fd{-1};
std::atomic<bool> g_signals_owned{false};

extern "C" void dagmesh_on_signal(int) {
  const int saved = errno;
  const int fd = g_signal_fd.load();
  if (fd >= 0) {
    const char byte = 1;
    [[maybe_unused]] const ssize_t n = ::write(fd, &byte, 1);
  }
  errno = saved;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Security settings: options first, then their environment variables (the contract shared with
// the CLI and the other SDKs).

ConnectionSettings resolve_connection(const WorkerOptions& options) {
  ConnectionSettings settings;
  settings.target = target_of(options.server);
  settings.tls = options.server.rfind("https://", 0) == 0;

  // The token: an explicit option (token, then token_file) wins over the environment
  // (DAGMESH_TOKEN, then DAGMESH_TOKEN_FILE).
  Setting token;
  Setting token_file;
  if (!options.token.empty()) {
    token = {options.token, "token"};
  } else if (!options.token_file.empty()) {
    token_file = {options.token_file, "token_file"};
  } else {
    token = pick("", "token", "DAGMESH_TOKEN");
    if (!token.set()) token_file = pick("", "token_file", "DAGMESH_TOKEN_FILE");
  }
  if (token.set()) {
    settings.token = trim(token.value);
    settings.token_source = token.name;
    if (settings.token.empty()) throw std::invalid_argument(token.name + " is blank");
  } else if (token_file.set()) {
    settings.token = trim(read_setting_file(token_file));
    settings.token_source = token_file.name + " " + token_file.value;
    if (settings.token.empty()) {
      throw std::invalid_argument(token_file.name + " file " + token_file.value +
                                  " holds no token (it is empty)");
    }
  }
  for (const char c : settings.token) {
    if (c < 0x20 || c > 0x7e) {
      throw std::invalid_argument(
          "the token from " + settings.token_source +
          " has a character that cannot go in a gRPC header (only printable ASCII)");
    }
  }

  const Setting ca = pick(options.tls_ca, "tls_ca", "DAGMESH_TLS_CA");
  const Setting cert = pick(options.tls_client_cert, "tls_client_cert", "DAGMESH_TLS_CLIENT_CERT");
  const Setting key = pick(options.tls_client_key, "tls_client_key", "DAGMESH_TLS_CLIENT_KEY");
  const Setting name = pick(options.tls_server_name, "tls_server_name", "DAGMESH_TLS_SERVER_NAME");
  if (!settings.tls) {
    for (const Setting* s : {&ca, &cert, &key, &name}) {
      if (s->set()) {
        throw std::invalid_argument(s->name + " is set but the server URL \"" + options.server +
                                    "\" is not https://: TLS settings need an https:// server URL");
      }
    }
    return settings;
  }
  if (cert.set() != key.set()) {
    const Setting& given = cert.set() ? cert : key;
    const char* missing = cert.set() ? "tls_client_key (DAGMESH_TLS_CLIENT_KEY)"
                                     : "tls_client_cert (DAGMESH_TLS_CLIENT_CERT)";
    throw std::invalid_argument(given.name + " is set without " + missing +
                                ": a client certificate needs its private key and the reverse");
  }
  if (ca.set()) settings.pem_root_certs = read_pem(ca, "-----BEGIN CERTIFICATE-----", "certificate");
  if (cert.set()) {
    settings.pem_cert_chain = read_pem(cert, "-----BEGIN CERTIFICATE-----", "certificate");
    settings.pem_private_key = read_pem(key, "PRIVATE KEY-----", "private key");
  }
  settings.tls_server_name = trim(name.value);
  return settings;
}

// ---------------------------------------------------------------------------------------------

struct Registered {
  std::string name;
  std::string version;
  Handler handler;
};

struct Worker::Impl {
  WorkerOptions options;
  ConnectionSettings connection;
  std::vector<Registered> tasks;

  std::shared_ptr<EventQueue> queue = std::make_shared<EventQueue>();
  std::atomic<bool> started{false};
  std::atomic<bool> drain_requested{false};
  std::atomic<bool> abort_requested{false};
  /// Welcome.max_payload_bytes of the current session; 0 means no limit known.
  std::shared_ptr<std::atomic<std::uint64_t>> max_payload =
      std::make_shared<std::atomic<std::uint64_t>>(0);

  mutable std::mutex state_mu;
  mutable std::condition_variable state_cv;
  WorkerState state;
  std::string last_error;

  std::unique_ptr<ThreadPool> pool;

  const Registered* handler(const std::string& name, const std::string& version) const {
    // An empty version (an executor that does not say) matches the one registered version.
    if (version.empty()) {
      const Registered* found = nullptr;
      for (const auto& t : tasks) {
        if (t.name != name) continue;
        if (found != nullptr) return nullptr;
        found = &t;
      }
      return found;
    }
    for (const auto& t : tasks) {
      if (t.name == name && t.version == version) return &t;
    }
    return nullptr;
  }

  void publish(const WorkerState& next) {
    {
      std::lock_guard<std::mutex> lock(state_mu);
      state = next;
    }
    state_cv.notify_all();
  }

  int run();
};

namespace {

/// Owns the protocol state for one Worker::run().
class Driver {
 public:
  explicit Driver(Worker::Impl& impl)
      : impl_(impl),
        queue_(impl.queue),
        backoff_(impl.options.reconnect_initial, impl.options.reconnect_max) {}

  ~Driver() { teardown_session(); }

  int run();

 private:
  enum class Phase { Offline, Handshaking, Connected };

  struct Entry {
    bool running = true;
    std::uint32_t slots = 1;
    std::shared_ptr<TaskContext> ctx;
    /// Completed or Failed, kept until Recorded.
    std::shared_ptr<v1::WorkerMessage> result;
    Clock::time_point last_progress{};
    Clock::time_point last_log_flush{};
  };

  // Session management.
  void start_session();
  void teardown_session();
  void on_broken();
  bool write(const v1::WorkerMessage& message);
  void broken(std::string reason) {
    if (!broken_) broken_ = std::move(reason);
  }
  /// Half-closes the stream and waits (briefly) for the executor to end its side.
  void close_stream();
  int close_drained();

  // Events.
  void handle(Event& event);
  void on_welcome(const v1::Welcome& welcome);
  void on_server_message(const v1::ServerMessage& message);
  void on_assign(const v1::Assign& assign);
  void on_recorded(const v1::Recorded& recorded);
  void on_cancel(const v1::Cancel& cancel);
  void on_finished(const TaskKey& key, std::shared_ptr<v1::WorkerMessage> result);
  void begin_drain(const std::string& why);

  /// Sends due progress and logs; returns when the next pending one is due.
  Clock::time_point flush_outboxes(Clock::time_point now);
  void flush_entry(const TaskKey& key, Entry& entry, Clock::time_point now, bool force,
                   Clock::time_point* next_due);

  void spawn(const TaskKey& key, const v1::Assign& assign, std::uint32_t slots,
             const Registered& registered);
  v1::WorkerMessage hello() const;
  void publish();

  Worker::Impl& impl_;
  std::shared_ptr<EventQueue> queue_;
  Backoff backoff_;

  /// Ordered so that Hello.in_flight and re-sent results come out in a stable order.
  std::map<TaskKey, Entry> tasks_;
  /// The worker itself was told to stop: it drains and run() returns.
  bool draining_ = false;
  /// The executor of the current stream sent Drain (it is going away): no new work from it;
  /// once nothing is in flight the stream is closed and the worker reconnects.
  bool executor_draining_ = false;
  /// After a stream the executor drained, the next Welcome does not reset the backoff: an
  /// executor that drains every stream at once is then dialled ever more slowly, not in a loop.
  bool reset_backoff_on_welcome_ = true;

  Phase phase_ = Phase::Offline;
  std::unique_ptr<Session> session_;
  std::uint64_t session_counter_ = 0;
  std::string session_id_;
  std::uint64_t sessions_ = 0;
  std::uint64_t max_payload_ = 0;
  Clock::time_point retry_at_{};
  Clock::time_point handshake_deadline_{};
  Clock::time_point heartbeat_next_{};
  milliseconds heartbeat_every_{kDefaultHeartbeat};
  bool sent_draining_ = false;
  /// The current session's stream has ended (its StreamEnded event was handled).
  bool session_ended_ = false;
  /// Set when the stream broke; handled (reconnect) by the main loop.
  std::optional<std::string> broken_;
  /// Set when the executor refused the Hello.
  std::optional<std::string> rejected_;
};

int Driver::run() {
  const ConnectionSettings& connection = impl_.connection;
  std::string security = connection.tls ? "TLS" : "plaintext";
  if (connection.tls) {
    security += connection.pem_root_certs.empty() ? ", system roots" : ", own CA";
    if (!connection.pem_cert_chain.empty()) security += ", client certificate";
    if (!connection.tls_server_name.empty()) security += ", verifying " + connection.tls_server_name;
  }
  security += connection.token.empty() ? ", no token" : ", token from " + connection.token_source;
  DAGMESH_INFO("worker " << impl_.options.name << " (instance " << impl_.options.instance_id
                         << ", " << impl_.options.slots << " slot(s)) connecting to "
                         << impl_.options.server << " (" << security << ")");
  retry_at_ = Clock::now();
  for (;;) {
    if (impl_.abort_requested.load()) {
      std::size_t running = 0;
      for (auto& [key, entry] : tasks_) {
        if (entry.running) {
          ++running;
          entry.ctx->cancel();
        }
      }
      const std::size_t unacknowledged = tasks_.size() - running;
      teardown_session();
      std::string error = "worker aborted with " + std::to_string(running) +
                          " task(s) running and " + std::to_string(unacknowledged) +
                          " unrecorded result(s)";
      DAGMESH_WARN(error);
      {
        std::lock_guard<std::mutex> lock(impl_.state_mu);
        impl_.last_error = error;
      }
      publish();
      return kAborted;
    }
    if (impl_.drain_requested.load() && !draining_) begin_drain("drain requested");
    if (draining_ && tasks_.empty()) {
      if (phase_ == Phase::Connected) return close_drained();
      teardown_session();
      phase_ = Phase::Offline;
      DAGMESH_INFO("drained");
      publish();
      return kDrained;
    }
    if (executor_draining_ && tasks_.empty() && phase_ == Phase::Connected && !broken_) {
      close_stream();
      reset_backoff_on_welcome_ = false;
      DAGMESH_INFO("executor drained this stream; reconnecting");
      retry_at_ = Clock::now() + backoff_.next_delay();
      publish();
      continue;
    }

    auto now = Clock::now();
    Clock::time_point deadline = now + milliseconds(1000);
    switch (phase_) {
      case Phase::Offline:
        if (now >= retry_at_) {
          start_session();
          deadline = handshake_deadline_;
        } else {
          deadline = retry_at_;
        }
        break;
      case Phase::Handshaking:
        if (now >= handshake_deadline_) {
          broken("no Welcome within " + std::to_string(kHandshakeTimeout.count() / 1000) + "s");
        }
        deadline = handshake_deadline_;
        break;
      case Phase::Connected: {
        if (draining_ && !sent_draining_) {
          v1::WorkerMessage draining;
          draining.mutable_draining();
          if (write(draining)) sent_draining_ = true;
        }
        if (now >= heartbeat_next_) {
          v1::WorkerMessage heartbeat;
          heartbeat.mutable_heartbeat();
          write(heartbeat);
          heartbeat_next_ = now + heartbeat_every_;
        }
        deadline = std::min(heartbeat_next_, flush_outboxes(now));
        break;
      }
    }
    if (broken_) {
      on_broken();
      continue;
    }

    auto events = queue_->wait_until(deadline);
    for (auto& event : events) handle(event);
    if (rejected_) {
      // Results can no longer be delivered: running handlers are told cancelled().
      for (auto& [key, entry] : tasks_) {
        if (entry.running) entry.ctx->cancel();
      }
      teardown_session();
      phase_ = Phase::Offline;
      {
        std::lock_guard<std::mutex> lock(impl_.state_mu);
        impl_.last_error = *rejected_;
      }
      DAGMESH_ERROR(*rejected_);
      publish();
      return kRejected;
    }
    if (broken_) on_broken();
  }
}

void Driver::on_broken() {
  if (draining_ && tasks_.empty() && phase_ == Phase::Connected) {
    // Drained and the stream is gone anyway (the executor closed it after its Drain): nothing
    // to reconnect for; the main loop returns.
    DAGMESH_DEBUG("stream ended while drained: " << *broken_);
    broken_.reset();
    return;
  }
  const bool was_connected = phase_ == Phase::Connected;
  if (was_connected) {
    DAGMESH_WARN("stream broken, reconnecting: " << *broken_);
  } else if (const ConnectHint hint = connect_hint(impl_.connection, *broken_); hint.text) {
    // Retrying may still help (a server whose certificate is being replaced), but a failed
    // certificate check is a setting to fix rather than an executor that is away.
    if (hint.error) {
      DAGMESH_ERROR("cannot open a stream to " << impl_.options.server << ", retrying: "
                                               << *broken_ << " (" << hint.text << ")");
    } else {
      DAGMESH_WARN("cannot open a stream to " << impl_.options.server << ", retrying: "
                                              << *broken_ << " (" << hint.text << ")");
    }
  } else {
    DAGMESH_WARN("cannot open a stream to " << impl_.options.server << ", retrying: " << *broken_);
  }
  broken_.reset();
  teardown_session();
  phase_ = Phase::Offline;
  session_id_.clear();
  executor_draining_ = false;
  retry_at_ = Clock::now() + backoff_.next_delay();
  publish();
}

void Driver::start_session() {
  const ConnectionSettings& connection = impl_.connection;
  const std::string& target = connection.target;
  std::shared_ptr<grpc::ChannelCredentials> creds;
  grpc::ChannelArguments args;
  if (connection.tls) {
    grpc::SslCredentialsOptions ssl;
    ssl.pem_root_certs = connection.pem_root_certs;  // empty: the system roots
    ssl.pem_private_key = connection.pem_private_key;
    ssl.pem_cert_chain = connection.pem_cert_chain;
    creds = grpc::SslCredentials(ssl);
    if (!connection.tls_server_name.empty()) {
      args.SetSslTargetNameOverride(connection.tls_server_name);
    }
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  // The executor enforces payload limits (and says which in Welcome); the transport should
  // not cut in first with its 4 MiB default.
  args.SetMaxReceiveMessageSize(-1);
  args.SetMaxSendMessageSize(-1);
  // The executor never writes to an idle worker, so only pings notice a dead peer.
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 15000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  // Each attempt gets a fresh channel, so the channel's own reconnect backoff never adds to ours.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);

  session_ = std::make_unique<Session>();
  session_->id = ++session_counter_;
  session_ended_ = false;
  if (!connection.token.empty()) {
    session_->context.AddMetadata("authorization", "Bearer " + connection.token);
  }
  session_->channel = grpc::CreateCustomChannel(target, creds, args);
  session_->stub = v1::WorkerService::NewStub(session_->channel);
  session_->reader = std::thread(session_main, session_.get(), hello(), queue_);
  phase_ = Phase::Handshaking;
  handshake_deadline_ = Clock::now() + kHandshakeTimeout;
  DAGMESH_DEBUG("opening a stream to " << target << " (session attempt " << session_->id << ")");
}

void Driver::teardown_session() {
  if (!session_) return;
  session_->context.TryCancel();
  if (session_->reader.joinable()) session_->reader.join();
  session_.reset();
}

bool Driver::write(const v1::WorkerMessage& message) {
  if (phase_ != Phase::Connected || !session_ || broken_) return false;
  std::lock_guard<std::mutex> lock(session_->write_mu);
  if (session_->finished || !session_->stream) {
    broken("stream closed while sending");
    return false;
  }
  if (!session_->stream->Write(message)) {
    broken("stream closed while sending");
    return false;
  }
  return true;
}

int Driver::close_drained() {
  if (!sent_draining_) {
    v1::WorkerMessage draining;
    draining.mutable_draining();
    write(draining);
    sent_draining_ = true;
  }
  close_stream();
  DAGMESH_INFO("drained");
  publish();
  return kDrained;
}

void Driver::close_stream() {
  // Half-close our side, then give the executor a moment to end its side, so it sees a clean
  // end of stream rather than a reset. Anything it still sends is ignored: nothing is in
  // flight, and an Assign racing the close comes back to the queue after the lease.
  bool ended = session_ended_;
  if (session_ && !ended) {
    {
      std::lock_guard<std::mutex> lock(session_->write_mu);
      if (!session_->finished && session_->stream) session_->stream->WritesDone();
    }
    const auto until = Clock::now() + kCloseGrace;
    const std::uint64_t id = session_->id;
    while (!ended && Clock::now() < until) {
      for (auto& event : queue_->wait_until(until)) {
        if (event.kind == Event::Kind::StreamEnded && event.session == id) ended = true;
      }
    }
    if (!ended) DAGMESH_DEBUG("executor kept the stream open after the drain; closing it");
  }
  teardown_session();
  phase_ = Phase::Offline;
  session_id_.clear();
  executor_draining_ = false;
}

void Driver::handle(Event& event) {
  switch (event.kind) {
    case Event::Kind::Finished:
      on_finished(event.key, std::move(event.result));
      return;
    case Event::Kind::Server:
      if (!session_ || event.session != session_->id || broken_) return;
      if (phase_ == Phase::Handshaking) {
        if (event.server->has_welcome()) {
          on_welcome(event.server->welcome());
        } else {
          broken("first server message is not Welcome");
        }
        return;
      }
      on_server_message(*event.server);
      return;
    case Event::Kind::StreamEnded: {
      if (!session_ || event.session != session_->id || broken_) return;
      session_ended_ = true;
      const auto& status = event.status;
      if (phase_ == Phase::Handshaking &&
          status.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
        // The Hello itself is wrong: retrying the same Hello cannot help.
        rejected_ = "executor rejected the worker: " + status.error_message();
        return;
      }
      if (const char* why = fatal_stream_code(status.error_code())) {
        // A missing, invalid, expired or revoked token, or one without the scope (a task type
        // outside its patterns): the same credentials would be refused again, for ever.
        rejected_ = std::string(why) + " (" + code_name(status.error_code()) +
                    "): " + status.error_message();
        if (!impl_.connection.token_source.empty()) {
          *rejected_ += " [token from " + impl_.connection.token_source + "]";
        } else {
          *rejected_ += " [no token given: set DAGMESH_TOKEN or DAGMESH_TOKEN_FILE]";
        }
        return;
      }
      if (status.ok()) {
        broken("executor closed the stream");
      } else {
        broken(std::string(code_name(status.error_code())) + ": " + status.error_message());
      }
      return;
    }
  }
}

void Driver::on_welcome(const v1::Welcome& welcome) {
  phase_ = Phase::Connected;
  if (reset_backoff_on_welcome_) backoff_.reset();
  reset_backoff_on_welcome_ = true;
  executor_draining_ = false;
  max_payload_ = welcome.max_payload_bytes();
  impl_.max_payload->store(max_payload_);
  ++sessions_;
  session_id_ = welcome.session_id();
  heartbeat_every_ = welcome.heartbeat_interval_ms() == 0
                         ? kDefaultHeartbeat
                         : milliseconds(welcome.heartbeat_interval_ms());
  heartbeat_next_ = Clock::now() + heartbeat_every_;
  sent_draining_ = false;
  DAGMESH_INFO("connected: session " << session_id_ << ", " << welcome.resumed_size()
                                     << " task(s) resumed of " << tasks_.size() << " in flight");
  // Tasks missing from `resumed` are stopped by the Cancel the executor sends for each
  // (protocol point 8); the list is only logged.
  for (const auto& [key, entry] : tasks_) {
    bool resumed = false;
    for (const auto& r : welcome.resumed()) {
      if (r.task_id() == key.first && r.attempt() == key.second) resumed = true;
    }
    if (!resumed) {
      DAGMESH_DEBUG("task " << key_text(key) << " not resumed by the executor"
                            << trace_text(entry.ctx.get()));
    }
  }
  publish();
  // Results the executor has not recorded go again: it records a duplicate once and answers
  // Recorded either way.
  for (const auto& [key, entry] : tasks_) {
    if (!entry.running && !write(*entry.result)) return;
  }
}

void Driver::on_server_message(const v1::ServerMessage& message) {
  switch (message.message_case()) {
    case v1::ServerMessage::kAssign:
      on_assign(message.assign());
      break;
    case v1::ServerMessage::kRecorded:
      on_recorded(message.recorded());
      break;
    case v1::ServerMessage::kCancel:
      on_cancel(message.cancel());
      break;
    case v1::ServerMessage::kDrain:
      // The executor is going away (a restart, a rollout): finish here, then resume with
      // whichever executor answers next. Only the worker's own stop ends the worker.
      if (!executor_draining_) {
        executor_draining_ = true;
        DAGMESH_INFO("executor is draining (" << message.drain().reason() << "); finishing "
                                              << tasks_.size()
                                              << " task(s) in flight, then reconnecting");
        publish();
      }
      break;
    case v1::ServerMessage::kWelcome:
      DAGMESH_WARN("second Welcome ignored");
      break;
    default:
      // A message kind from a newer executor.
      DAGMESH_DEBUG("unknown server message ignored");
      break;
  }
}

void Driver::on_assign(const v1::Assign& assign) {
  const TaskKey key{assign.task_id(), assign.attempt()};
  // The same attempt twice (the executor lost our Started): answer from what we hold.
  if (auto it = tasks_.find(key); it != tasks_.end()) {
    if (it->second.running) {
      write(started_message(key));
    } else {
      write(*it->second.result);
    }
    return;
  }

  const std::uint32_t slots = std::max<std::uint32_t>(assign.slots(), 1);
  // 64 bits: a broken executor may send any `slots`, and the sum must not wrap.
  std::uint64_t used = 0;
  for (const auto& [k, entry] : tasks_) {
    if (entry.running) used += entry.slots;
  }
  const auto& task_type = assign.task_type();
  const Registered* registered = impl_.handler(task_type.name(), task_type.version());
  std::string refusal;
  bool retryable = true;
  if (draining_) {
    refusal = "worker is draining";
  } else if (executor_draining_) {
    refusal = "worker is draining: the executor asked it to (assigned after Drain)";
  } else if (used + slots > impl_.options.slots) {
    refusal = "worker " + impl_.options.instance_id + " has no room: task needs " +
              std::to_string(slots) + " slot(s), " + std::to_string(used) + " of " +
              std::to_string(impl_.options.slots) + " in use";
  } else if (registered == nullptr) {
    refusal = "worker " + impl_.options.instance_id + " has no handler for " +
              nlohmann::json(task_type.name()).dump() + " version " +
              nlohmann::json(task_type.version()).dump();
  } else if (auto error = check_inputs(task_type.name(), assign.inputs(), max_payload_)) {
    // The executor checks step inputs against the limits it announced; inputs past them mean
    // a broken executor. Not retryable: the same inputs would come again.
    refusal = *error;
    retryable = false;
  }
  if (!refusal.empty()) {
    const auto trace = parse_traceparent(assign.traceparent());
    DAGMESH_WARN("assignment " << key_text(key) << " refused: " << refusal
                               << trace_text(trace ? trace->trace_id : ""));
    Entry entry;
    entry.running = false;
    entry.result = failed_message(key, refusal, retryable);
    auto result = entry.result;
    tasks_.emplace(key, std::move(entry));
    publish();
    write(*result);
    return;
  }
  // Started only for work taken: a refusal without Started tells a draining worker's executor
  // that the task was handed back, not attempted.
  if (!write(started_message(key))) return;
  spawn(key, assign, slots, *registered);
  publish();
}

void Driver::spawn(const TaskKey& key, const v1::Assign& assign, std::uint32_t slots,
                   const Registered& registered) {
  TaskContext::Info info;
  info.task_id = assign.task_id();
  info.attempt = assign.attempt();
  info.run_id = assign.run_id();
  info.step_id = assign.step_id();
  info.task_type = registered.name;
  info.task_version = registered.version;
  info.traceparent = assign.traceparent();
  if (assign.has_deadline()) {
    const auto& ts = assign.deadline();
    info.deadline = std::chrono::system_clock::time_point(
        std::chrono::duration_cast<std::chrono::system_clock::duration>(
            std::chrono::seconds(ts.seconds()) + std::chrono::nanoseconds(ts.nanos())));
  }
  auto ctx = std::make_shared<TaskContext>(std::move(info));
  std::weak_ptr<EventQueue> weak_queue = queue_;
  detail::ContextAccess::set_wake(*ctx, [weak_queue] {
    if (auto queue = weak_queue.lock()) queue->wake();
  });

  Entry entry;
  entry.running = true;
  entry.slots = slots;
  entry.ctx = ctx;
  entry.last_log_flush = Clock::now();
  tasks_.emplace(key, std::move(entry));

  DAGMESH_INFO("task " << key_text(key) << " started: " << registered.name << " "
                       << registered.version << " (run " << assign.run_id() << ", step "
                       << assign.step_id() << ")" << trace_text(ctx.get()));
  auto inputs = std::make_shared<nlohmann::json>(struct_to_json(assign.inputs()));
  Handler handler = registered.handler;
  std::string task_type = registered.name;
  auto queue = queue_;
  auto max_payload = impl_.max_payload;
  impl_.pool->submit([key, ctx, inputs, handler, task_type, queue, max_payload] {
    std::shared_ptr<v1::WorkerMessage> result;
    try {
      nlohmann::json output = handler(*ctx, *inputs);
      google::protobuf::Struct outputs = json_to_struct(output);
      const std::size_t size = payload_size(outputs);
      if (auto error = check_outputs(task_type, outputs, max_payload->load())) {
        DAGMESH_WARN("task " << key_text(key) << " failed: " << *error << trace_text(ctx.get()));
        result = failed_message(key, *error, false);
      } else {
        DAGMESH_INFO("task " << key_text(key) << " completed (" << size << " output bytes)"
                             << trace_text(ctx.get()));
        result = std::make_shared<v1::WorkerMessage>();
        auto* completed = result->mutable_completed();
        completed->set_task_id(key.first);
        completed->set_attempt(key.second);
        *completed->mutable_outputs() = std::move(outputs);
      }
    } catch (const TaskError& e) {
      DAGMESH_WARN("task " << key_text(key) << " failed (retryable=" << e.retryable()
                           << "): " << e.what() << trace_text(ctx.get()));
      result = failed_message(key, e.what(), e.retryable());
    } catch (const std::exception& e) {
      DAGMESH_WARN("task " << key_text(key) << " failed: " << e.what() << trace_text(ctx.get()));
      result = failed_message(key, e.what(), true);
    } catch (...) {
      DAGMESH_WARN("task " << key_text(key) << " failed: non-standard exception"
                           << trace_text(ctx.get()));
      result = failed_message(key, "task handler threw a non-standard exception", true);
    }
    Event event;
    event.kind = Event::Kind::Finished;
    event.key = key;
    event.result = std::move(result);
    queue->push(std::move(event));
  });
}

void Driver::on_finished(const TaskKey& key, std::shared_ptr<v1::WorkerMessage> result) {
  auto it = tasks_.find(key);
  if (it == tasks_.end() || !it->second.running) return;
  Entry& entry = it->second;
  // Whatever the handler reported last goes out before its result.
  if (phase_ == Phase::Connected) flush_entry(key, entry, Clock::now(), true, nullptr);
  entry.running = false;
  entry.result = std::move(result);
  publish();
  if (phase_ == Phase::Connected) write(*entry.result);
}

void Driver::on_recorded(const v1::Recorded& recorded) {
  const TaskKey key{recorded.task_id(), recorded.attempt()};
  auto it = tasks_.find(key);
  if (it == tasks_.end()) {
    DAGMESH_DEBUG("Recorded for an unknown task " << key_text(key));
    return;
  }
  const std::string trace = trace_text(it->second.ctx.get());
  if (it->second.running) {
    DAGMESH_WARN("Recorded for " << key_text(key) << " before any result; ignored" << trace);
    return;
  }
  tasks_.erase(it);
  if (recorded.outcome() == v1::RECORD_OUTCOME_STALE) {
    DAGMESH_WARN("result of " << key_text(key) << " refused as stale: " << recorded.detail()
                              << trace);
  } else {
    DAGMESH_DEBUG("result of " << key_text(key) << " recorded ("
                               << v1::RecordOutcome_Name(recorded.outcome()) << ")" << trace);
  }
  publish();
}

void Driver::on_cancel(const v1::Cancel& cancel) {
  const TaskKey key{cancel.task_id(), cancel.attempt()};
  auto it = tasks_.find(key);
  if (it != tasks_.end() && it->second.running) {
    DAGMESH_INFO("task " << key_text(key) << " cancelled: " << cancel.reason()
                         << trace_text(it->second.ctx.get()));
    it->second.ctx->cancel();
  } else {
    // A result already on its way is answered with Recorded anyway.
    DAGMESH_DEBUG("Cancel for " << key_text(key) << ", which is not running"
                                << (it != tasks_.end() ? trace_text(it->second.ctx.get()) : ""));
  }
}

void Driver::begin_drain(const std::string& why) {
  if (draining_) return;
  draining_ = true;
  DAGMESH_INFO("draining (" << why << "), " << tasks_.size() << " task(s) in flight");
  publish();
}

Clock::time_point Driver::flush_outboxes(Clock::time_point now) {
  Clock::time_point next_due = Clock::time_point::max();
  for (auto& [key, entry] : tasks_) {
    if (!entry.running) continue;
    flush_entry(key, entry, now, false, &next_due);
    if (broken_) break;
  }
  return next_due;
}

void Driver::flush_entry(const TaskKey& key, Entry& entry, Clock::time_point now, bool force,
                         Clock::time_point* next_due) {
  bool has_progress = false;
  std::size_t log_lines = 0;
  if (!detail::ContextAccess::has_pending(*entry.ctx, &has_progress, &log_lines)) return;
  if (has_progress) {
    if (force || now - entry.last_progress >= kProgressMinInterval) {
      if (auto progress = entry.ctx->take_progress()) {
        v1::WorkerMessage message;
        auto* p = message.mutable_progress();
        p->set_task_id(key.first);
        p->set_attempt(key.second);
        p->set_fraction(progress->fraction);
        p->set_message(progress->message);
        for (const auto& [name, value] : progress->metrics) (*p->mutable_metrics())[name] = value;
        entry.last_progress = now;
        if (!write(message)) return;
      }
    } else if (next_due != nullptr) {
      *next_due = std::min(*next_due, entry.last_progress + kProgressMinInterval);
    }
  }
  if (log_lines > 0) {
    const bool due = force || now - entry.last_log_flush >= kLogFlushInterval ||
                     log_lines >= detail::kLogEarlyFlushLines;
    if (!due) {
      if (next_due != nullptr) *next_due = std::min(*next_due, entry.last_log_flush + kLogFlushInterval);
      return;
    }
    std::uint64_t dropped = 0;
    std::vector<TaskContext::LogRecord> lines = entry.ctx->take_logs(&dropped);
    if (!lines.empty() || dropped > 0) {
      v1::WorkerMessage message;
      auto* log = message.mutable_log();
      log->set_task_id(key.first);
      log->set_attempt(key.second);
      for (const auto& line : lines) {
        auto* l = log->add_lines();
        const auto since = line.at.time_since_epoch();
        const auto secs = std::chrono::duration_cast<std::chrono::seconds>(since);
        l->mutable_at()->set_seconds(secs.count());
        l->mutable_at()->set_nanos(static_cast<std::int32_t>(
            std::chrono::duration_cast<std::chrono::nanoseconds>(since - secs).count()));
        l->set_level(to_string(line.level));
        l->set_text(line.text);
      }
      if (dropped > 0) {
        auto* l = log->add_lines();
        const auto since = std::chrono::system_clock::now().time_since_epoch();
        const auto secs = std::chrono::duration_cast<std::chrono::seconds>(since);
        l->mutable_at()->set_seconds(secs.count());
        l->set_level("warn");
        l->set_text(std::to_string(dropped) +
                    " log line(s) dropped: logged faster than the stream carried");
      }
      entry.last_log_flush = now;
      write(message);
    }
  }
}

v1::WorkerMessage Driver::hello() const {
  v1::WorkerMessage message;
  auto* hello = message.mutable_hello();
  hello->set_worker_name(impl_.options.name);
  hello->set_instance_id(impl_.options.instance_id);
  for (const auto& t : impl_.tasks) {
    auto* tt = hello->add_task_types();
    tt->set_name(t.name);
    tt->set_version(t.version);
  }
  for (const auto& [k, v] : impl_.options.labels) (*hello->mutable_labels())[k] = v;
  hello->set_slots(impl_.options.slots);
  hello->set_sdk_language("cpp");
  hello->set_sdk_version(sdk_version());
  for (const auto& [key, entry] : tasks_) {
    auto* ref = hello->add_in_flight();
    ref->set_task_id(key.first);
    ref->set_attempt(key.second);
  }
  return message;
}

void Driver::publish() {
  WorkerState state;
  state.connected = phase_ == Phase::Connected;
  state.session_id = state.connected ? session_id_ : std::string();
  state.draining = draining_;
  state.executor_draining = executor_draining_;
  for (const auto& [key, entry] : tasks_) {
    if (entry.running) {
      ++state.running;
    } else {
      ++state.unacknowledged;
    }
  }
  state.sessions = sessions_;
  state.max_payload_bytes = max_payload_;
  impl_.publish(state);
}

}  // namespace

int Worker::Impl::run() {
  if (tasks.empty()) {
    std::lock_guard<std::mutex> lock(state_mu);
    last_error = "a worker needs at least one task type";
  } else if (options.slots == 0) {
    std::lock_guard<std::mutex> lock(state_mu);
    last_error = "slots must be at least 1";
  } else {
    pool = std::make_unique<ThreadPool>(options.slots);
    Driver driver(*this);
    return driver.run();
  }
  DAGMESH_ERROR(last_error);
  return kRejected;
}

// ---------------------------------------------------------------------------------------------

Worker::Worker(WorkerOptions options) : impl_(std::make_unique<Impl>()) {
  if (options.name.empty()) options.name = default_name();
  if (options.instance_id.empty()) options.instance_id = options.name + "-" + random_suffix();
  impl_->connection = resolve_connection(options);
  impl_->options = std::move(options);
}

Worker::~Worker() {
  // Handlers still running (after abort()) are joined here; they were told cancelled().
  impl_->pool.reset();
}

Worker& Worker::task(const std::string& name, const std::string& version, Handler handler) {
  if (impl_->started.load()) throw std::logic_error("Worker::task called after run()");
  if (name.empty()) throw std::invalid_argument("task type name is empty");
  if (!valid_semver(version)) {
    throw std::invalid_argument("task type \"" + name + "\" has an invalid version \"" +
                                version + "\" (want a semantic version such as 1.0.0)");
  }
  if (!handler) throw std::invalid_argument("task type \"" + name + "\" has no handler");
  for (const auto& t : impl_->tasks) {
    if (t.name == name && t.version == version) {
      throw std::invalid_argument("task type \"" + name + "\" version " + version +
                                  " is registered twice");
    }
  }
  impl_->tasks.push_back(Registered{name, version, std::move(handler)});
  return *this;
}

int Worker::run(bool handle_signals) {
  if (impl_->started.exchange(true)) throw std::logic_error("Worker::run called twice");

  int pipe_fds[2] = {-1, -1};
  struct sigaction old_term {};
  struct sigaction old_int {};
  std::thread watcher;
  bool owns_signals = false;
  if (handle_signals) {
    bool expected = false;
    if (!g_signals_owned.compare_exchange_strong(expected, true)) {
      DAGMESH_WARN("another Worker::run handles SIGTERM/SIGINT; this one does not");
    } else if (::pipe(pipe_fds) != 0) {
      g_signals_owned.store(false);
      DAGMESH_WARN("cannot create the signal pipe: " << std::strerror(errno));
    } else {
      owns_signals = true;
      ::fcntl(pipe_fds[1], F_SETFL, ::fcntl(pipe_fds[1], F_GETFL) | O_NONBLOCK);
      ::fcntl(pipe_fds[0], F_SETFD, FD_CLOEXEC);
      ::fcntl(pipe_fds[1], F_SETFD, FD_CLOEXEC);
      g_signal_fd.store(pipe_fds[1]);
      struct sigaction action {};
      action.sa_handler = dagmesh_on_signal;
      sigemptyset(&action.sa_mask);
      action.sa_flags = SA_RESTART;
      ::sigaction(SIGTERM, &action, &old_term);
      ::sigaction(SIGINT, &action, &old_int);
      const int read_fd = pipe_fds[0];
      watcher = std::thread([this, read_fd] {
        int signals = 0;
        for (;;) {
          char byte = 0;
          const ssize_t n = ::read(read_fd, &byte, 1);
          if (n < 0 && errno == EINTR) continue;
          if (n <= 0 || byte == 0) return;  // run() is returning
          ++signals;
          if (signals == 1) {
            DAGMESH_INFO("signal received, draining (signal again to abort)");
            drain();
          } else {
            DAGMESH_WARN("second signal, aborting");
            abort();
          }
        }
      });
    }
  }

  int result = kRejected;
  try {
    result = impl_->run();
  } catch (...) {
    if (owns_signals) {
      const char stop = 0;
      [[maybe_unused]] ssize_t n = ::write(pipe_fds[1], &stop, 1);
      watcher.join();
    }
    throw;
  }

  if (owns_signals) {
    ::sigaction(SIGTERM, &old_term, nullptr);
    ::sigaction(SIGINT, &old_int, nullptr);
    g_signal_fd.store(-1);
    const char stop = 0;
    [[maybe_unused]] ssize_t n = ::write(pipe_fds[1], &stop, 1);
    watcher.join();
    ::close(pipe_fds[0]);
    ::close(pipe_fds[1]);
    g_signals_owned.store(false);
  }
  return result;
}

void Worker::drain() {
  impl_->drain_requested.store(true);
  impl_->queue->wake();
}

void Worker::abort() {
  impl_->abort_requested.store(true);
  impl_->queue->wake();
}

WorkerState Worker::state() const {
  std::lock_guard<std::mutex> lock(impl_->state_mu);
  return impl_->state;
}

bool Worker::wait_for(const std::function<bool(const WorkerState&)>& predicate,
                      std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(impl_->state_mu);
  return impl_->state_cv.wait_for(lock, timeout, [&] { return predicate(impl_->state); });
}

const std::string& Worker::name() const noexcept { return impl_->options.name; }

const std::string& Worker::instance_id() const noexcept { return impl_->options.instance_id; }

std::string Worker::last_error() const {
  std::lock_guard<std::mutex> lock(impl_->state_mu);
  return impl_->last_error;
}

}  // namespace dagmesh
