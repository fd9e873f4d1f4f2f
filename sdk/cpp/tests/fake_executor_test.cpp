// The worker's security against an in-process fake executor (a gRPC WorkerService that checks
// the bearer token and answers the Hello), so that tokens, TLS, mTLS and refused credentials are
// tested without a dagmesh server:
//
//   dagmesh_fake_executor_test token|unauthenticated|permission_denied|tls|mtls
//
// tls and mtls make their certificates with the openssl CLI (tests/make_certs.sh) and skip
// (exit 77) without it.

#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <grpcpp/grpcpp.h>

#include "dagmesh/dagmesh.hpp"
#include "dagmesh/v1/worker.grpc.pb.h"

namespace {

namespace v1 = ::dagmesh::v1;
using std::chrono::milliseconds;
using std::chrono::seconds;

int failures = 0;

#define CHECK(cond)                                                                      \
  do {                                                                                   \
    if (!(cond)) {                                                                       \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);      \
      ++failures;                                                                        \
    }                                                                                    \
  } while (0)

struct Skip {};

bool contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return true;
  std::fprintf(stderr, "  \"%s\" does not contain \"%s\"\n", text.c_str(), part.c_str());
  return false;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// --- the fake executor -------------------------------------------------------------------------

class FakeExecutor final : public v1::WorkerService::Service {
 public:
  enum class Mode { Accept, Unauthenticated, PermissionDenied };

  Mode mode = Mode::Accept;
  /// Empty: any token (or none) is accepted.
  std::string expected_token;
  /// End the first accepted stream with UNAVAILABLE right after the Welcome (the worker
  /// reconnects).
  bool drop_first = false;

  grpc::Status Connect(grpc::ServerContext* context,
                       grpc::ServerReaderWriter<v1::ServerMessage, v1::WorkerMessage>* stream) override {
    const int call = ++calls;
    std::string auth = "<none>";
    const auto& metadata = context->client_metadata();
    if (auto it = metadata.find("authorization"); it != metadata.end()) {
      auth.assign(it->second.data(), it->second.size());
    }
    std::string peer;
    if (auto auth_context = context->auth_context()) {
      for (const auto& id : auth_context->GetPeerIdentity()) peer.assign(id.data(), id.size());
    }
    {
      std::lock_guard<std::mutex> lock(mu);
      authorization.push_back(auth);
      peers.push_back(peer);
    }
    if (mode == Mode::Unauthenticated ||
        (!expected_token.empty() && auth != "Bearer " + expected_token)) {
      return grpc::Status(grpc::StatusCode::UNAUTHENTICATED, "invalid token (fake executor)");
    }
    v1::WorkerMessage hello;
    if (!stream->Read(&hello) || !hello.has_hello()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "first message is not Hello");
    }
    if (mode == Mode::PermissionDenied) {
      return grpc::Status(grpc::StatusCode::PERMISSION_DENIED,
                          "token may not serve task type \"t\" (fake executor)");
    }
    v1::ServerMessage welcome;
    welcome.mutable_welcome()->set_session_id("session-" + std::to_string(call));
    welcome.mutable_welcome()->set_heartbeat_interval_ms(200);
    welcome.mutable_welcome()->set_max_payload_bytes(1 << 20);
    stream->Write(welcome);
    if (drop_first && call == 1) {
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "dropped on purpose");
    }
    v1::WorkerMessage message;
    while (stream->Read(&message)) {
    }
    return grpc::Status::OK;
  }

  std::atomic<int> calls{0};
  std::mutex mu;
  std::vector<std::string> authorization;
  std::vector<std::string> peers;
};

struct Server {
  FakeExecutor service;
  std::unique_ptr<grpc::Server> server;
  int port = 0;

  void start(std::shared_ptr<grpc::ServerCredentials> credentials) {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", credentials, &port);
    builder.RegisterService(&service);
    server = builder.BuildAndStart();
    if (!server || port == 0) {
      std::fprintf(stderr, "cannot start the fake executor\n");
      std::exit(1);
    }
  }

  ~Server() {
    if (server) server->Shutdown(std::chrono::system_clock::now() + seconds(2));
  }

  std::vector<std::string> authorization() {
    std::lock_guard<std::mutex> lock(service.mu);
    return service.authorization;
  }
  std::vector<std::string> peers() {
    std::lock_guard<std::mutex> lock(service.mu);
    return service.peers;
  }
};

// --- running a worker --------------------------------------------------------------------------

/// A worker running on its own thread.
struct Running {
  std::unique_ptr<dagmesh::Worker> worker;
  std::thread thread;
  std::atomic<int> result{-1};

  explicit Running(const dagmesh::WorkerOptions& options) {
    worker = std::make_unique<dagmesh::Worker>(options);
    worker->task("t", "1.0.0", [](dagmesh::TaskContext&, const nlohmann::json&) {
      return nlohmann::json::object();
    });
    thread = std::thread([this] { result = worker->run(false); });
  }

  bool connects(milliseconds timeout = milliseconds(10000)) {
    return worker->wait_for([](const dagmesh::WorkerState& s) { return s.connected; }, timeout);
  }

  /// Returns run()'s result once it came within `timeout`, else -1 (and stops the worker).
  int finish(milliseconds timeout) {
    const auto until = std::chrono::steady_clock::now() + timeout;
    while (result.load() < 0 && std::chrono::steady_clock::now() < until) {
      std::this_thread::sleep_for(milliseconds(10));
    }
    const int code = result.load();
    if (code < 0) worker->abort();
    thread.join();
    return code;
  }

  int drain() {
    worker->drain();
    return finish(seconds(10));
  }

  ~Running() {
    if (thread.joinable()) {
      worker->abort();
      thread.join();
    }
  }
};

dagmesh::WorkerOptions options_for(const Server& server, bool tls) {
  dagmesh::WorkerOptions options;
  options.name = "fake-test";
  options.server = std::string(tls ? "https" : "http") + "://127.0.0.1:" + std::to_string(server.port);
  options.reconnect_initial = milliseconds(50);
  options.reconnect_max = milliseconds(200);
  return options;
}

void clear_security_env() {
  for (const char* name : {"DAGMESH_TOKEN", "DAGMESH_TOKEN_FILE", "DAGMESH_TLS_CA",
                           "DAGMESH_TLS_CLIENT_CERT", "DAGMESH_TLS_CLIENT_KEY",
                           "DAGMESH_TLS_SERVER_NAME"}) {
    ::unsetenv(name);
  }
}

// --- certificates ------------------------------------------------------------------------------

struct Certs {
  std::string dir;
  std::string path(const std::string& name) const { return dir + "/" + name; }
  std::string pem(const std::string& name) const { return read_file(path(name)); }
};

Certs make_certs() {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0) {
    std::fprintf(stderr, "openssl not found: skipped\n");
    throw Skip{};
  }
  char dir_template[] = "/tmp/dagmesh-fake-tls-XXXXXX";
  if (::mkdtemp(dir_template) == nullptr) std::exit(1);
  Certs certs{dir_template};
  const std::string command = std::string("bash '") + DAGMESH_MAKE_CERTS + "' '" + certs.dir + "'";
  if (std::system(command.c_str()) != 0) {
    std::fprintf(stderr, "make_certs.sh failed\n");
    std::exit(1);
  }
  return certs;
}

std::shared_ptr<grpc::ServerCredentials> server_tls(const Certs& certs, bool require_client_cert) {
  grpc::SslServerCredentialsOptions options(
      require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
                          : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE);
  if (require_client_cert) options.pem_root_certs = certs.pem("ca.pem");
  options.pem_key_cert_pairs.push_back({certs.pem("server.key"), certs.pem("server.pem")});
  return grpc::SslServerCredentials(options);
}

/// The worker keeps trying and never connects; a drain still ends it.
void never_connects(const dagmesh::WorkerOptions& options, const char* what) {
  std::fprintf(stderr, "-- %s: must not connect\n", what);
  Running running(options);
  const bool connected = running.connects(milliseconds(2500));
  if (connected) std::fprintf(stderr, "  %s connected\n", what);
  CHECK(!connected);
  CHECK(running.drain() == dagmesh::kDrained);
}

// --- scenarios ---------------------------------------------------------------------------------

/// Every stream carries `authorization: Bearer <token>`, the reconnect's too.
void test_token() {
  Server server;
  server.service.expected_token = "dmt_fake_secret";
  server.service.drop_first = true;
  server.start(grpc::InsecureServerCredentials());

  // From the option, over plaintext.
  auto options = options_for(server, false);
  options.token = "dmt_fake_secret";
  {
    Running running(options);
    CHECK(running.worker->wait_for(
        [](const dagmesh::WorkerState& s) { return s.connected && s.sessions >= 2; }, seconds(10)));
    CHECK(running.drain() == dagmesh::kDrained);
  }
  auto headers = server.authorization();
  CHECK(headers.size() >= 2);
  for (const auto& h : headers) CHECK(h == "Bearer dmt_fake_secret");

  // From DAGMESH_TOKEN_FILE.
  char path[] = "/tmp/dagmesh-fake-token-XXXXXX";
  const int fd = ::mkstemp(path);
  CHECK(fd >= 0);
  const std::string content = "dmt_fake_secret\n";
  CHECK(::write(fd, content.data(), content.size()) == static_cast<ssize_t>(content.size()));
  ::close(fd);
  ::setenv("DAGMESH_TOKEN_FILE", path, 1);
  {
    Running running(options_for(server, false));
    CHECK(running.connects());
    CHECK(running.drain() == dagmesh::kDrained);
  }
  clear_security_env();
  ::unlink(path);
  CHECK(server.authorization().back() == "Bearer dmt_fake_secret");
}

/// A refused token ends run() with kRejected after one attempt, naming the code and the
/// server's message; no token at all says how to give one.
void test_unauthenticated() {
  Server server;
  server.service.expected_token = "dmt_right";
  server.start(grpc::InsecureServerCredentials());

  auto options = options_for(server, false);
  options.token = "dmt_wrong";
  {
    Running running(options);
    CHECK(running.finish(seconds(10)) == dagmesh::kRejected);
    const auto error = running.worker->last_error();
    CHECK(contains(error, "UNAUTHENTICATED"));
    CHECK(contains(error, "invalid token (fake executor)"));
    CHECK(contains(error, "token from token"));
    CHECK(!running.worker->state().connected);
  }
  CHECK(server.service.calls.load() == 1);

  options.token.clear();
  {
    Running running(options);
    CHECK(running.finish(seconds(10)) == dagmesh::kRejected);
    CHECK(contains(running.worker->last_error(), "no token given"));
  }
  CHECK(server.service.calls.load() == 2);
  CHECK(server.authorization().back() == "<none>");
}

/// A token without the scope (a task type outside its patterns) ends run() too.
void test_permission_denied() {
  Server server;
  server.service.mode = FakeExecutor::Mode::PermissionDenied;
  server.start(grpc::InsecureServerCredentials());
  auto options = options_for(server, false);
  options.token = "dmt_narrow";
  Running running(options);
  CHECK(running.finish(seconds(10)) == dagmesh::kRejected);
  const auto error = running.worker->last_error();
  CHECK(contains(error, "PERMISSION_DENIED"));
  CHECK(contains(error, "token may not serve task type \"t\" (fake executor)"));
  CHECK(server.service.calls.load() == 1);
}

/// TLS: the CA from the option or DAGMESH_TLS_CA, the server name override; an untrusted
/// certificate or a wrong name never connects.
void test_tls() {
  const Certs certs = make_certs();
  Server server;
  server.service.expected_token = "dmt_tls";
  server.start(server_tls(certs, false));

  auto options = options_for(server, true);
  options.token = "dmt_tls";
  options.tls_ca = certs.path("ca.pem");
  {
    Running running(options);
    CHECK(running.connects());
    CHECK(running.drain() == dagmesh::kDrained);
  }
  CHECK(server.authorization().back() == "Bearer dmt_tls");

  // From the environment, with https://localhost.
  auto from_env = options_for(server, true);
  from_env.server = "https://localhost:" + std::to_string(server.port);
  ::setenv("DAGMESH_TLS_CA", certs.path("ca.pem").c_str(), 1);
  ::setenv("DAGMESH_TOKEN", "dmt_tls", 1);
  {
    Running running(from_env);
    CHECK(running.connects());
    CHECK(running.drain() == dagmesh::kDrained);
  }

  // The server name override is what gets verified.
  ::setenv("DAGMESH_TLS_SERVER_NAME", "localhost", 1);
  {
    Running running(options_for(server, true));
    CHECK(running.connects());
    CHECK(running.drain() == dagmesh::kDrained);
  }
  auto wrong_name = options_for(server, true);
  wrong_name.tls_server_name = "wrong.example";
  never_connects(wrong_name, "a name the certificate does not hold");
  clear_security_env();

  auto other_ca = options;
  other_ca.tls_ca = certs.path("other-ca.pem");
  never_connects(other_ca, "a CA that did not sign the server certificate");
  auto system_roots = options;
  system_roots.tls_ca.clear();
  never_connects(system_roots, "the system roots");
  auto plaintext = options;
  plaintext.server = "http://127.0.0.1:" + std::to_string(server.port);
  plaintext.tls_ca.clear();
  never_connects(plaintext, "plaintext to a TLS port");
  std::system(("rm -rf '" + certs.dir + "'").c_str());
}

/// mTLS: with the client certificate the worker connects (the server sees its CN); without it,
/// never.
void test_mtls() {
  const Certs certs = make_certs();
  Server server;
  server.start(server_tls(certs, true));

  auto options = options_for(server, true);
  options.tls_ca = certs.path("ca.pem");
  options.tls_client_cert = certs.path("client.pem");
  options.tls_client_key = certs.path("client.key");
  {
    Running running(options);
    CHECK(running.connects());
    CHECK(running.drain() == dagmesh::kDrained);
  }
  CHECK(server.peers().back() == "dagmesh-test-client");

  ::setenv("DAGMESH_TLS_CLIENT_CERT", certs.path("client.pem").c_str(), 1);
  ::setenv("DAGMESH_TLS_CLIENT_KEY", certs.path("client.key").c_str(), 1);
  {
    auto from_env = options;
    from_env.tls_client_cert.clear();
    from_env.tls_client_key.clear();
    Running running(from_env);
    CHECK(running.connects());
    CHECK(running.drain() == dagmesh::kDrained);
  }
  clear_security_env();

  auto no_cert = options;
  no_cert.tls_client_cert.clear();
  no_cert.tls_client_key.clear();
  never_connects(no_cert, "no client certificate");
  auto self_signed = options;  // a certificate the client CA did not sign
  self_signed.tls_client_cert = certs.path("other-ca.pem");
  self_signed.tls_client_key = certs.path("other-ca.key");
  never_connects(self_signed, "a client certificate from another CA");
  std::system(("rm -rf '" + certs.dir + "'").c_str());
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> groups = {
      {"token", test_token},
      {"unauthenticated", test_unauthenticated},
      {"permission_denied", test_permission_denied},
      {"tls", test_tls},
      {"mtls", test_mtls}};
  clear_security_env();
  int ran = 0;
  try {
    for (const auto& [name, fn] : groups) {
      if (argc > 1 && name != argv[1]) continue;
      std::fprintf(stderr, "== %s\n", name.c_str());
      fn();
      ++ran;
    }
  } catch (const Skip&) {
    return 77;
  }
  if (ran == 0) {
    std::fprintf(stderr, "no test group named %s\n", argc > 1 ? argv[1] : "");
    return 2;
  }
  if (failures > 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::fprintf(stderr, "all checks passed\n");
  return 0;
}
