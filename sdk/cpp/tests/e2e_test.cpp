// End-to-end tests of the C++ SDK against a real `dagmesh up`.
//
//   dagmesh_e2e_test workflow|payload_limit|cancel|drain|reconnect|rejected|executor_drain|
//                    stop_during_executor_drain|tls|auth_refused|mtls
//
// Each scenario starts its own server (SQLite and --data-dir in a temporary directory, a free
// port, readiness polled through the CLI, never a fixed sleep), runs the C++ workers as child
// processes and checks the outcome with `dagmesh runs get ID -o json`. The server's admin token
// (DATA_DIR/admin.token, written by `dagmesh up` with auth on) goes to the CLI and the workers as
// DAGMESH_TOKEN; a server without auth (no such file) is used without one. The TLS scenarios
// make their certificates with the openssl CLI (tests/make_certs.sh).
//
// Environment: DAGMESH_BIN (the dagmesh binary), DAGMESH_GPU_TOOL_WORKER (cpp-gpu-tool-worker),
// DAGMESH_E2E_REQUIRED=1 (a missing binary fails instead of skipping), DAGMESH_E2E_KEEP=1 (keep
// the temporary directory with the logs).

#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

extern char** environ;

namespace {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;
using std::chrono::seconds;

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

std::string env_or(const char* name, const std::string& fallback) {
  const char* value = std::getenv(name);
  return value != nullptr && *value != '\0' ? value : fallback;
}

bool executable(const std::string& path) { return ::access(path.c_str(), X_OK) == 0; }

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string tail(const std::string& text, std::size_t bytes = 4000) {
  return text.size() <= bytes ? text : "..." + text.substr(text.size() - bytes);
}

void log(const std::string& line) {
  std::cerr << "[e2e] " << line << std::endl;
}

// --- processes -------------------------------------------------------------------------------

struct Child {
  std::string name;
  pid_t pid = -1;
  std::string out;
  std::string err;
  std::optional<int> status;  // waitpid status once reaped
};

std::vector<Child*> g_children;

/// Changes to a child's environment: a value sets the variable, nullopt removes it.
using EnvChanges = std::map<std::string, std::optional<std::string>>;

/// This process's environment with `changes` applied, as "NAME=value" strings.
std::vector<std::string> child_environment(const EnvChanges& changes) {
  std::vector<std::string> entries;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string entry = *e;
    const std::string name = entry.substr(0, entry.find('='));
    if (changes.count(name) == 0) entries.push_back(entry);
  }
  for (const auto& [name, value] : changes) {
    if (value) entries.push_back(name + "=" + *value);
  }
  return entries;
}

[[noreturn]] void exec_child(const std::vector<std::string>& argv, const EnvChanges& changes) {
  const auto environment = child_environment(changes);
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  std::vector<char*> envp;
  for (const auto& e : environment) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  ::execve(args[0], args.data(), envp.data());
  std::perror("execve");
  ::_exit(127);
}

pid_t spawn(const std::vector<std::string>& argv, const std::string& out, const std::string& err,
            const EnvChanges& changes = {}) {
  const pid_t pid = ::fork();
  if (pid < 0) throw Failure("fork failed");
  if (pid == 0) {
    const int o = ::open(out.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    const int in = ::open("/dev/null", O_RDONLY);
    ::dup2(in, 0);
    ::dup2(o, 1);
    ::dup2(e, 2);
    exec_child(argv, changes);
  }
  return pid;
}

/// Reaps the child if it exited; returns whether it is still running.
bool alive(Child& child) {
  if (child.status) return false;
  int status = 0;
  const pid_t r = ::waitpid(child.pid, &status, WNOHANG);
  if (r == child.pid) {
    child.status = status;
    return false;
  }
  return r == 0;
}

/// Waits for the child to exit; its exit code, or nullopt on timeout.
std::optional<int> wait_exit(Child& child, milliseconds timeout) {
  const auto until = Clock::now() + timeout;
  while (alive(child)) {
    if (Clock::now() >= until) return std::nullopt;
    std::this_thread::sleep_for(milliseconds(20));
  }
  if (WIFEXITED(*child.status)) return WEXITSTATUS(*child.status);
  return 128 + WTERMSIG(*child.status);
}

void kill_child(Child& child, int sig) {
  if (alive(child)) ::kill(child.pid, sig);
}

void cleanup_children() {
  for (Child* child : g_children) {
    if (alive(*child)) {
      ::kill(child->pid, SIGKILL);
      wait_exit(*child, seconds(5));
    }
  }
  g_children.clear();
}

struct Captured {
  int code = -1;
  std::string out;
};

/// Runs a command to completion (at most `timeout`), capturing stdout; stderr goes to `err`.
Captured capture(const std::vector<std::string>& argv, const std::string& err,
                 const EnvChanges& changes = {}, milliseconds timeout = milliseconds(30000)) {
  int fds[2];
  if (::pipe(fds) != 0) throw Failure("pipe failed");
  const pid_t pid = ::fork();
  if (pid < 0) throw Failure("fork failed");
  if (pid == 0) {
    const int e = ::open(err.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ::dup2(fds[1], 1);
    ::dup2(e, 2);
    ::close(fds[0]);
    exec_child(argv, changes);
  }
  ::close(fds[1]);
  ::fcntl(fds[0], F_SETFL, O_NONBLOCK);
  Captured result;
  const auto until = Clock::now() + timeout;
  int status = 0;
  bool done = false;
  for (;;) {
    char buf[65536];
    const ssize_t n = ::read(fds[0], buf, sizeof buf);
    if (n > 0) {
      result.out.append(buf, static_cast<std::size_t>(n));
      continue;
    }
    if (!done && ::waitpid(pid, &status, WNOHANG) == pid) done = true;
    if (done && n == 0) break;
    if (done && n < 0 && errno != EAGAIN) break;
    if (Clock::now() >= until) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, &status, 0);
      ::close(fds[0]);
      throw Failure("command timed out: " + argv[0] + " " + (argv.size() > 3 ? argv[3] : ""));
    }
    if (n <= 0) std::this_thread::sleep_for(milliseconds(5));
  }
  ::close(fds[0]);
  result.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return result;
}

int free_port() {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    throw Failure("cannot bind a free port");
  }
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  ::close(fd);
  return port;
}

template <typename F>
bool eventually(F&& condition, milliseconds timeout, milliseconds every = milliseconds(50)) {
  const auto until = Clock::now() + timeout;
  for (;;) {
    if (condition()) return true;
    if (Clock::now() >= until) return false;
    std::this_thread::sleep_for(every);
  }
}

void expect(bool condition, const std::string& what) {
  if (!condition) throw Failure(what);
}

// --- the environment of one scenario ----------------------------------------------------------

const char* const kSecurityVariables[] = {"DAGMESH_TOKEN",           "DAGMESH_TOKEN_FILE",
                                          "DAGMESH_TLS_CA",          "DAGMESH_TLS_CLIENT_CERT",
                                          "DAGMESH_TLS_CLIENT_KEY", "DAGMESH_TLS_SERVER_NAME"};

struct Env {
  std::string dagmesh;
  std::string conformance;
  std::string gpu_tool;
  std::string dir;
  int port = 0;
  std::string url;
  Child server;
  std::vector<std::string> server_extra;
  std::string lease = "2s";
  std::vector<std::unique_ptr<Child>> workers;
  /// The environment of the CLI and the workers: the admin token once the server wrote one,
  /// TLS settings; every other security variable of the test's own environment removed.
  EnvChanges client_env;
  /// The admin token `dagmesh up` wrote (empty: auth is off).
  std::string admin_token;

  std::string cli_err() const { return dir + "/cli.err"; }
  std::string data_dir() const { return dir + "/data"; }

  void init() {
    for (const char* name : kSecurityVariables) client_env[name] = std::nullopt;
    url = "http://127.0.0.1:" + std::to_string(port);
  }

  /// TLS from now on: the server gets the certificate (and the client CA for mTLS), the URL
  /// turns https and the clients trust `ca`.
  void use_tls(const std::string& certs, bool mtls) {
    url = "https://127.0.0.1:" + std::to_string(port);
    server_extra.insert(server_extra.end(), {"--tls-cert", certs + "/server.pem", "--tls-key",
                                             certs + "/server.key"});
    if (mtls) server_extra.insert(server_extra.end(), {"--tls-client-ca", certs + "/ca.pem"});
    client_env["DAGMESH_TLS_CA"] = certs + "/ca.pem";
    if (mtls) {
      client_env["DAGMESH_TLS_CLIENT_CERT"] = certs + "/client.pem";
      client_env["DAGMESH_TLS_CLIENT_KEY"] = certs + "/client.key";
    }
  }

  /// Picks up DATA_DIR/admin.token once `dagmesh up` wrote it.
  void read_admin_token() {
    const std::string path = data_dir() + "/admin.token";
    if (::access(path.c_str(), R_OK) != 0) return;
    std::string token = read_file(path);
    while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back()))) token.pop_back();
    while (!token.empty() && std::isspace(static_cast<unsigned char>(token.front()))) token.erase(0, 1);
    if (token.empty() || token == admin_token) return;
    admin_token = token;
    client_env["DAGMESH_TOKEN"] = token;
    log("admin token from " + path);
  }

  void start_server() {
    server = Child{};
    server.name = "dagmesh up";
    server.out = dir + "/server.log";
    server.err = dir + "/server.log";
    std::vector<std::string> argv = {dagmesh, "up", "--listen", "127.0.0.1:" + std::to_string(port),
                                     "--database", "sqlite://" + dir + "/db.sqlite",
                                     "--data-dir", data_dir(),
                                     "--lease", lease, "--heartbeat-interval", "200ms"};
    argv.insert(argv.end(), server_extra.begin(), server_extra.end());
    // The server's own settings come from its flags only.
    EnvChanges server_env;
    for (const char* name : {"DAGMESH_TLS_CERT", "DAGMESH_TLS_KEY", "DAGMESH_TLS_CLIENT_CA"}) {
      server_env[name] = std::nullopt;
    }
    server.pid = spawn(argv, server.out, server.err, server_env);
    g_children.push_back(&server);
    // Ready when the CLI gets an answer; polled, no fixed sleep.
    const bool ready = eventually(
        [&] {
          if (!alive(server)) {
            throw Failure("dagmesh up exited early:\n" + tail(read_file(server.out)));
          }
          read_admin_token();
          return cli({"workers", "list", "-o", "json"}).code == 0;
        },
        seconds(60), milliseconds(100));
    expect(ready, "dagmesh up not ready within 60 s:\n" + tail(read_file(server.out)) +
                      "\n--- cli.err\n" + tail(read_file(cli_err()), 2000));
    log("server ready on " + url + (admin_token.empty() ? " (no admin token: auth off)" : ""));
  }

  Captured cli(std::vector<std::string> args) const {
    std::vector<std::string> argv = {dagmesh, "--server", url};
    argv.insert(argv.end(), args.begin(), args.end());
    return capture(argv, cli_err(), client_env);
  }

  json cli_json(std::vector<std::string> args) const {
    const auto result = cli(args);
    if (result.code != 0) {
      throw Failure("dagmesh " + args[0] + " failed (" + std::to_string(result.code) + "):\n" +
                    tail(read_file(cli_err())));
    }
    try {
      return json::parse(result.out);
    } catch (const std::exception& e) {
      throw Failure(std::string("cannot parse CLI output: ") + e.what() + "\n" + result.out);
    }
  }

  /// Starts a worker with the clients' environment, changed by `changes`.
  Child& start_worker(const std::string& name, std::vector<std::string> argv,
                      const EnvChanges& changes = {}) {
    auto child = std::make_unique<Child>();
    child->name = name;
    child->out = dir + "/" + name + ".out";
    child->err = dir + "/" + name + ".err";
    EnvChanges environment = client_env;
    for (const auto& [variable, value] : changes) environment[variable] = value;
    child->pid = spawn(argv, child->out, child->err, environment);
    g_children.push_back(child.get());
    workers.push_back(std::move(child));
    return *workers.back();
  }

  Child& start_conformance(const std::string& instance, int slots = 2,
                           const EnvChanges& changes = {}, std::vector<std::string> flags = {}) {
    std::vector<std::string> argv = {conformance, "--server", url, "--instance-id", instance,
                                     "--slots", std::to_string(slots)};
    argv.insert(argv.end(), flags.begin(), flags.end());
    return start_worker(instance, argv, changes);
  }

  /// Whether `instance` is listed as connected.
  bool connected(const std::string& instance) {
    for (const auto& w : cli_json({"workers", "list", "-o", "json"}).value("workers", json::array())) {
      if (w.value("instance_id", "") == instance && w.value("connected", false)) return true;
    }
    return false;
  }

  /// Waits until every instance is connected to the executor.
  void wait_workers(const std::vector<std::string>& instances) {
    const bool ok = eventually(
        [&] {
          for (auto& w : workers) {
            if (std::find(instances.begin(), instances.end(), w->name) == instances.end()) continue;
            if (!alive(*w)) throw Failure(w->name + " exited early:\n" + tail(read_file(w->err)));
          }
          const auto list = cli_json({"workers", "list", "-o", "json"});
          for (const auto& instance : instances) {
            bool found = false;
            for (const auto& w : list.value("workers", json::array())) {
              if (w.value("instance_id", "") == instance && w.value("connected", false)) found = true;
            }
            if (!found) return false;
          }
          return true;
        },
        seconds(30), milliseconds(100));
    expect(ok, "workers did not connect:\n" + cli({"workers", "list"}).out);
  }

  /// Submits a one-step echo run and waits for it; returns the run.
  json echo_run(const std::string& name) {
    const auto id = submit(name, "name: cpp-e2e-" + name + R"(
steps:
  - id: echo
    task: conformance.echo@^1
    inputs: { x: "1" }
)");
    return wait_run(id, milliseconds(30000));
  }

  std::string submit(const std::string& name, const std::string& yaml) {
    const std::string path = dir + "/" + name + ".yaml";
    std::ofstream(path) << yaml;
    const auto reply = cli_json({"submit", path, "-o", "json"});
    const auto run = reply.contains("run") ? reply["run"] : reply;
    const std::string id = run.value("run_id", "");
    expect(!id.empty(), "submit gave no run id: " + reply.dump());
    log("submitted " + name + ": run " + id);
    return id;
  }

  json get_run(const std::string& id) const {
    const auto reply = cli_json({"runs", "get", id, "-o", "json"});
    return reply.contains("run") ? reply["run"] : reply;
  }

  json wait_run(const std::string& id, milliseconds timeout = milliseconds(90000)) {
    json run;
    const bool done = eventually(
        [&] {
          run = get_run(id);
          const std::string state = run.value("state", "");
          return state == "RUN_STATE_SUCCEEDED" || state == "RUN_STATE_FAILED" ||
                 state == "RUN_STATE_CANCELLED";
        },
        timeout, milliseconds(100));
    expect(done, "run " + id + " did not finish: " + run.dump(2));
    log("run " + id + " ended " + run.value("state", ""));
    return run;
  }

  static const json& step(const json& run, const std::string& step_id) {
    for (const auto& s : run.at("steps")) {
      if (s.value("step_id", "") == step_id) return s;
    }
    throw Failure("run has no step " + step_id + ": " + run.dump(2));
  }

  bool has_line(const Child& child, const std::string& line) const {
    const auto text = read_file(child.out);
    return text.find(line + "\n") != std::string::npos;
  }

  std::string diagnostics() const {
    std::string text = "--- server.log\n" + tail(read_file(dir + "/server.log"));
    for (const auto& w : workers) {
      text += "\n--- " + w->name + " stdout\n" + tail(read_file(w->out), 2000);
      text += "\n--- " + w->name + " stderr\n" + tail(read_file(w->err));
    }
    return text;
  }
};

void expect_state(const json& run, const std::string& state, Env& env) {
  if (run.value("state", "") != state) {
    throw Failure("run state is " + run.value("state", "") + ", want " + state + "\n" +
                  run.dump(2) + "\n" + env.diagnostics());
  }
}

// --- scenarios --------------------------------------------------------------------------------

/// echo + progress on the conformance worker, mesh.smooth on the cpp-gpu-tool worker (CPU).
void scenario_workflow(Env& env) {
  env.start_server();
  env.start_conformance("cpp-conf-1");
  env.start_worker("gpu-tool-1", {env.gpu_tool, "--server", env.url, "--instance-id",
                                  "gpu-tool-1", "--cpu-only"});
  env.wait_workers({"cpp-conf-1", "gpu-tool-1"});

  const auto id = env.submit("workflow", R"(name: cpp-e2e
steps:
  - id: echo
    task: conformance.echo@^1
    inputs:
      msg: "'hello'"
      n: "42"
      ratio: "0.5"
      flags: "[1, 2.5, true, null]"
      nested: '{"a": {"b": "c"}}'
  - id: progress
    task: conformance.progress@^1
    needs: [echo]
    inputs: { steps: "5" }
  - id: smooth
    task: mesh.smooth@^1
    needs: [echo]
    inputs: { rings: "64", segments: "128", iterations: "3000", noise: "0.05", seed: "7" }
)");
  const auto run = env.wait_run(id);
  expect_state(run, "RUN_STATE_SUCCEEDED", env);

  const auto& echo = Env::step(run, "echo");
  const json want = {{"msg", "hello"},
                     {"n", 42},
                     {"ratio", 0.5},
                     {"flags", {1, 2.5, true, nullptr}},
                     {"nested", {{"a", {{"b", "c"}}}}}};
  expect(echo.at("outputs") == want, "echo outputs " + echo.at("outputs").dump() + ", want " +
                                         want.dump());
  expect(echo.value("worker", "") == "cpp-conf-1", "echo ran on " + echo.value("worker", ""));
  expect(echo.value("task_version", "") == "1.0.0", "echo version " + echo.value("task_version", ""));

  const auto& progress = Env::step(run, "progress");
  expect(progress.at("outputs") == json{{"done", 5}}, "progress outputs " + progress.at("outputs").dump());
  expect(progress.value("progress", 0.0) == 1.0, "progress fraction " + progress.dump());
  expect(progress.value("progress_message", "") == "step 5", "progress message " + progress.dump());

  const auto& smooth = Env::step(run, "smooth");
  const auto& out = smooth.at("outputs");
  expect(smooth.value("worker", "") == "gpu-tool-1", "smooth ran on " + smooth.value("worker", ""));
  expect(out.value("backend", "") == "cpu", "smooth backend " + out.dump());
  expect(out.value("vertices", 0) == 64 * 128, "smooth vertices " + out.dump());
  expect(out.value("iterations", 0) == 3000, "smooth iterations " + out.dump());
  expect(out.value("roughness_after", 1.0) < out.value("roughness_before", 0.0),
         "smoothing did not reduce the roughness: " + out.dump());
  expect(smooth.value("progress", 0.0) == 1.0, "smooth progress " + smooth.dump());

  const std::string echo_task = echo.value("task_id", "");
  expect(env.has_line(*env.workers[0], "EVENT started " + echo_task + " 1"),
         "no EVENT started line for " + echo_task);
  expect(env.has_line(*env.workers[0], "EVENT started " + Env::step(run, "progress").value("task_id", "") + " 1"),
         "no EVENT started line for progress");

  // The SDK's own lines about a task end with the trace id of its traceparent (the executor
  // sends one with every Assign), and the steps of one run share one trace.
  const auto started_trace = [&](const std::string& task_id) {
    std::istringstream lines(read_file(env.workers[0]->err));
    const std::string start = "task " + task_id + "#1 started: ";
    const std::string marker = " trace_id=";
    for (std::string line; std::getline(lines, line);) {
      const auto at = line.find(start);
      const auto mark = line.rfind(marker);
      if (at == std::string::npos || mark == std::string::npos || mark < at) continue;
      const std::string id = line.substr(mark + marker.size());
      if (id.size() == 32 && id.find_first_not_of("0123456789abcdef") == std::string::npos) return id;
    }
    return std::string();
  };
  const std::string echo_trace = started_trace(echo_task);
  expect(!echo_trace.empty(), "no \"task " + echo_task + "#1 started: ... trace_id=<32 hex>\" line:\n" +
                                  tail(read_file(env.workers[0]->err)));
  expect(started_trace(Env::step(run, "progress").value("task_id", "")) == echo_trace,
         "the progress step's started line does not name the echo step's trace " + echo_trace);

  // The run's event log: progress streamed while the handlers ran, logs batched.
  const auto events = env.cli({"runs", "watch", id, "--after-seq", "0", "-o", "json"});
  expect(events.code == 0, "runs watch failed: " + tail(read_file(env.cli_err())));
  std::vector<std::string> progress_messages;
  double last_fraction = -1;
  bool monotonic = true;
  int smooth_midway = 0;
  bool smooth_logged = false;
  std::istringstream lines(events.out);
  for (std::string line; std::getline(lines, line);) {
    if (line.empty()) continue;
    const auto doc = json::parse(line);
    const auto& e = doc.contains("event") ? doc["event"] : doc;
    if (e.contains("step_progress")) {
      const auto& p = e["step_progress"];
      const double fraction = p.value("fraction", 0.0);
      if (p.value("step_id", "") == "progress") {
        progress_messages.push_back(p.value("message", ""));
        if (fraction <= last_fraction) monotonic = false;
        last_fraction = fraction;
      } else if (p.value("step_id", "") == "smooth" && fraction > 0 &&
                 p.value("message", "").rfind("iteration ", 0) == 0) {
        // Any report of the loop (the executor keeps at most ~5 a second per step, the latest
        // winning, so a loop shorter than 200 ms may leave only its last one, at 1.0).
        ++smooth_midway;
      }
    }
    if (e.contains("step_log") && e["step_log"].value("step_id", "") == "smooth") {
      for (const auto& l : e["step_log"].value("lines", json::array())) {
        if (l.value("text", "").find("mesh.smooth: 8192 vertices") != std::string::npos) smooth_logged = true;
      }
    }
  }
  std::string seen;
  for (const auto& m : progress_messages) seen += "[" + m + "] ";
  // Reports are 60 ms apart and forwarded at most every 50 ms: most arrive one by one.
  expect(progress_messages.size() >= 3 && monotonic && progress_messages.back() == "step 5",
         "progress events of the progress step: " + seen);
  expect(smooth_midway >= 1, "no progress from inside the smoothing loop");
  expect(smooth_logged, "the smooth step's log line did not arrive");

  // The worker list reports the C++ SDK.
  const auto workers = env.cli_json({"workers", "list", "-o", "json"});
  bool labels_ok = false;
  for (const auto& w : workers.value("workers", json::array())) {
    if (w.value("instance_id", "") == "gpu-tool-1") {
      // --cpu-only: no gpu label.
      labels_ok = !w.contains("labels") || !w["labels"].contains("gpu");
    }
  }
  expect(labels_ok, "gpu-tool-1 carries a gpu label with --cpu-only: " + workers.dump());
}

/// An output over Welcome.max_payload_bytes fails the step, non-retryable, naming the limit.
void scenario_payload_limit(Env& env) {
  env.server_extra = {"--max-payload-bytes", "65536"};
  env.start_server();
  env.start_conformance("cpp-conf-big");
  env.wait_workers({"cpp-conf-big"});
  const auto id = env.submit("big", R"(name: cpp-e2e-big
continue_on_failure: true
steps:
  - id: fits
    task: conformance.big@^1
    inputs: { bytes: "1000" }
  - id: too_big
    task: conformance.big@^1
    inputs: { bytes: "100000" }
    retry: { max_attempts: 3, initial_backoff: 100ms }
)");
  const auto run = env.wait_run(id);
  expect_state(run, "RUN_STATE_FAILED", env);
  const auto& fits = Env::step(run, "fits");
  expect(fits.value("state", "") == "STEP_STATE_SUCCEEDED", "fits: " + fits.dump());
  expect(fits.at("outputs").value("blob", "") == std::string(1000, 'x'), "fits blob");
  const auto& big = Env::step(run, "too_big");
  expect(big.value("state", "") == "STEP_STATE_FAILED", "too_big: " + big.dump());
  const std::string error = big.value("error", "");
  expect(error.find("output of \"conformance.big\" is ") != std::string::npos &&
             error.find(" bytes, over the 65536-byte payload limit") != std::string::npos,
         "too_big error: " + error);
  expect(big.value("attempt", 0) == 1, "a non-retryable failure was retried: " + big.dump());
}

/// Cancel reaches a running handler; the worker stays usable.
void scenario_cancel(Env& env) {
  env.start_server();
  auto& worker = env.start_conformance("cpp-conf-cancel", 1);
  env.wait_workers({"cpp-conf-cancel"});
  const auto id = env.submit("cancel", R"(name: cpp-e2e-cancel
steps:
  - id: wait
    task: conformance.wait_cancel@^1
)");
  const std::string task = id + "/wait";
  expect(eventually([&] { return env.has_line(worker, "EVENT started " + task + " 1"); }, seconds(30)),
         "wait_cancel did not start\n" + env.diagnostics());
  const auto cancelled = env.cli({"runs", "cancel", id});
  expect(cancelled.code == 0, "runs cancel failed: " + tail(read_file(env.cli_err())));
  expect(eventually([&] { return env.has_line(worker, "EVENT cancelled " + task + " 1"); }, seconds(30)),
         "no EVENT cancelled line\n" + env.diagnostics());
  const auto run = env.wait_run(id);
  expect_state(run, "RUN_STATE_CANCELLED", env);

  // The slot comes back (the Failed result answers the Cancel): the next run goes through.
  const auto next = env.submit("after-cancel", R"(name: cpp-e2e-after-cancel
steps:
  - id: echo
    task: conformance.echo@^1
    inputs: { x: "1" }
)");
  expect_state(env.wait_run(next, milliseconds(30000)), "RUN_STATE_SUCCEEDED", env);
}

/// SIGTERM drains: the running task finishes, its result is recorded, the worker exits 0.
void scenario_drain(Env& env) {
  env.start_server();
  auto& worker = env.start_conformance("cpp-conf-drain", 2);
  env.wait_workers({"cpp-conf-drain"});
  const auto id = env.submit("drain", R"(name: cpp-e2e-drain
steps:
  - id: nap
    task: conformance.sleep@^1
    inputs: { ms: "3000" }
)");
  expect(eventually([&] { return env.has_line(worker, "EVENT started " + id + "/nap 1"); }, seconds(30)),
         "sleep did not start\n" + env.diagnostics());
  kill_child(worker, SIGTERM);
  // Draining is visible to the executor while the task still runs.
  const bool draining_seen = eventually(
      [&] {
        for (const auto& w : env.cli_json({"workers", "list", "-o", "json"}).value("workers", json::array())) {
          if (w.value("instance_id", "") == "cpp-conf-drain" && w.value("draining", false)) return true;
        }
        return false;
      },
      seconds(5), milliseconds(50));
  const auto code = wait_exit(worker, seconds(30));
  expect(code.has_value(), "worker did not exit after SIGTERM\n" + env.diagnostics());
  expect(*code == 0, "worker exit code " + std::to_string(*code) + "\n" + env.diagnostics());
  const auto run = env.wait_run(id, milliseconds(10000));
  expect_state(run, "RUN_STATE_SUCCEEDED", env);
  const auto& nap = Env::step(run, "nap");
  // 3 s of handler time under a 2 s lease: heartbeats kept flowing while it computed.
  expect(nap.at("outputs") == json{{"slept", 3000}, {"attempt", 1}}, "nap outputs " + nap.dump());
  expect(nap.value("attempt", 0) == 1 && nap.value("lost_attempts", 0) == 0,
         "the task was lost during the drain: " + nap.dump());
  expect(draining_seen, "the executor never saw the worker draining");
}

/// The executor goes away (SIGKILL) and comes back on the same database:
///  1. a task finishes while the executor is down: its result is kept and sent again after the
///     reconnect, and recorded for attempt 1;
///  2. a task is still running across the restart: the worker reconnects with the same instance
///     id, lists it in Hello.in_flight, keeps it, and its result is recorded for attempt 1.
void scenario_reconnect(Env& env) {
  // A lease long enough to cover the restart plus the worker's backoff (up to 5 s).
  env.lease = "15s";
  env.start_server();
  auto& worker = env.start_conformance("cpp-conf-reconnect", 1);
  env.wait_workers({"cpp-conf-reconnect"});

  const auto first = env.submit("offline-result", R"(name: cpp-e2e-offline-result
steps:
  - id: nap
    task: conformance.sleep@^1
    inputs: { ms: "800" }
)");
  expect(eventually([&] { return env.has_line(worker, "EVENT started " + first + "/nap 1"); }, seconds(30)),
         "sleep did not start\n" + env.diagnostics());
  kill_child(env.server, SIGKILL);
  wait_exit(env.server, seconds(10));
  log("server killed while the task runs");
  const std::string completed = "task " + first + "/nap#1 completed";
  expect(eventually([&] { return read_file(worker.err).find(completed) != std::string::npos; }, seconds(20)),
         "the task did not complete while the executor was down\n" + env.diagnostics());
  log("task completed while the server is down; restarting it");
  env.start_server();
  env.wait_workers({"cpp-conf-reconnect"});
  auto run = env.wait_run(first);
  expect_state(run, "RUN_STATE_SUCCEEDED", env);
  const auto& nap1 = Env::step(run, "nap");
  expect(nap1.value("attempt", 0) == 1 && nap1.at("outputs") == json{{"slept", 800}, {"attempt", 1}},
         "offline result not recorded for attempt 1: " + nap1.dump());

  const auto second = env.submit("running-across-restart", R"(name: cpp-e2e-reconnect
steps:
  - id: nap
    task: conformance.sleep@^1
    inputs: { ms: "2500" }
)");
  expect(eventually([&] { return env.has_line(worker, "EVENT started " + second + "/nap 1"); }, seconds(30)),
         "second sleep did not start\n" + env.diagnostics());
  kill_child(env.server, SIGKILL);
  wait_exit(env.server, seconds(10));
  log("server killed again; restarting it at once");
  env.start_server();
  env.wait_workers({"cpp-conf-reconnect"});
  run = env.wait_run(second);
  expect_state(run, "RUN_STATE_SUCCEEDED", env);
  const auto& nap2 = Env::step(run, "nap");
  expect(nap2.value("attempt", 0) == 1 && nap2.at("outputs").value("slept", 0) == 2500,
         "running task not kept across the reconnect: " + nap2.dump());
  expect(env.has_line(worker, "EVENT started " + second + "/nap 1") &&
             !env.has_line(worker, "EVENT started " + second + "/nap 2"),
         "the task ran twice");
  expect(alive(worker), "worker died across the server restarts\n" + env.diagnostics());
  expect(read_file(worker.err).find("reconnecting") != std::string::npos,
         "worker log shows no reconnect");
  // And it still drains cleanly.
  kill_child(worker, SIGTERM);
  const auto code = wait_exit(worker, seconds(30));
  expect(code && *code == 0, "worker did not drain after the reconnects\n" + env.diagnostics());
}

/// Starts a 1.5 s sleep step and SIGTERMs the server while it runs: the executor drains (sends
/// Drain, waits for the task). Returns the run id once the worker logged the Drain.
std::string drain_server_during_a_task(Env& env, Child& worker, const std::string& name) {
  const auto id = env.submit(name, "name: cpp-e2e-" + name + R"(
steps:
  - id: nap
    task: conformance.sleep@^1
    inputs: { ms: "1500" }
)");
  expect(eventually([&] { return env.has_line(worker, "EVENT started " + id + "/nap 1"); }, seconds(30)),
         "sleep did not start\n" + env.diagnostics());
  kill_child(env.server, SIGTERM);
  expect(eventually([&] { return read_file(worker.err).find("executor is draining") != std::string::npos; },
                    seconds(20)),
         "the worker never heard the executor's Drain\n" + env.diagnostics());
  return id;
}

/// The executor shuts down (SIGTERM) while a task runs and comes back on the same port and
/// database: the worker finishes the task (recorded before the executor exits), stays up,
/// reconnects and runs a new step.
void scenario_executor_drain(Env& env) {
  env.start_server();
  auto& worker = env.start_conformance("cpp-conf-exec-drain", 1);
  env.wait_workers({"cpp-conf-exec-drain"});
  const auto first = drain_server_during_a_task(env, worker, "before-restart");
  const auto server_code = wait_exit(env.server, seconds(30));
  expect(server_code && *server_code == 0, "dagmesh up did not drain and exit 0\n" + env.diagnostics());
  expect(alive(worker), "the worker exited with its executor\n" + env.diagnostics());

  env.start_server();
  env.wait_workers({"cpp-conf-exec-drain"});
  const auto run = env.get_run(first);
  expect_state(run, "RUN_STATE_SUCCEEDED", env);
  expect(Env::step(run, "nap").value("attempt", 0) == 1, "the drained task ran again: " + run.dump());
  const auto second = env.submit("after-restart", R"(name: cpp-e2e-after-restart
steps:
  - id: echo
    task: conformance.echo@^1
    inputs: { x: "1" }
)");
  expect_state(env.wait_run(second, milliseconds(30000)), "RUN_STATE_SUCCEEDED", env);
  expect(env.has_line(worker, "EVENT started " + second + "/echo 1"), "the new step ran elsewhere");

  kill_child(worker, SIGTERM);
  const auto code = wait_exit(worker, seconds(30));
  expect(code && *code == 0, "worker did not drain after the restart\n" + env.diagnostics());
}

/// The worker is itself told to stop (SIGTERM) while its executor drains: it finishes the task,
/// waits for Recorded, and exits 0 instead of reconnecting.
void scenario_stop_during_executor_drain(Env& env) {
  env.start_server();
  auto& worker = env.start_conformance("cpp-conf-stop-drain", 1);
  env.wait_workers({"cpp-conf-stop-drain"});
  const auto id = drain_server_during_a_task(env, worker, "stop-during-drain");
  kill_child(worker, SIGTERM);
  const auto code = wait_exit(worker, seconds(30));
  expect(code.has_value(), "worker still running after its own SIGTERM\n" + env.diagnostics());
  expect(*code == 0, "exit code " + std::to_string(*code) + "\n" + env.diagnostics());
  const auto err = read_file(worker.err);
  const auto first_session = err.find("connected: session");
  expect(first_session != std::string::npos &&
             err.find("connected: session", first_session + 1) == std::string::npos &&
             err.find("cannot open a stream") == std::string::npos,
         "reconnected after its own stop:\n" + err);
  const auto server_code = wait_exit(env.server, seconds(30));
  expect(server_code && *server_code == 0, "dagmesh up did not drain and exit 0\n" + env.diagnostics());

  // The result was recorded before the executor went.
  env.start_server();
  expect_state(env.get_run(id), "RUN_STATE_SUCCEEDED", env);
}

/// An executor that refuses the Hello (INVALID_ARGUMENT) stops the worker: exit code 2, no
/// retry loop.
void scenario_rejected(Env& env) {
  env.start_server();
  auto& worker = env.start_worker("bad", {env.conformance, "--server", env.url, "--instance-id",
                                          "bad/instance"});
  const auto code = wait_exit(worker, seconds(20));
  expect(code.has_value(), "worker kept running after INVALID_ARGUMENT\n" + env.diagnostics());
  expect(*code == 2, "exit code " + std::to_string(*code) + ", want 2\n" + env.diagnostics());
  const auto err = read_file(worker.err);
  expect(err.find("executor rejected the worker") != std::string::npos &&
             err.find("instance_id") != std::string::npos,
         "no rejection message naming the field:\n" + err);
}

// --- security: tokens, TLS, mTLS -----------------------------------------------------------------

struct Skip : std::runtime_error {
  using std::runtime_error::runtime_error;
};

/// A throwaway PKI (tests/make_certs.sh, the openssl CLI) in DIR/certs; returns that folder.
std::string make_certs(const Env& env) {
  if (std::system("command -v openssl >/dev/null 2>&1") != 0) throw Skip("the openssl CLI is missing");
  const std::string certs = env.dir + "/certs";
  const std::string command = std::string("bash '") + DAGMESH_MAKE_CERTS + "' '" + certs + "'";
  expect(std::system(command.c_str()) == 0, "make_certs.sh failed");
  return certs;
}

/// `dagmesh tokens create ARGS...`: the token it prints.
std::string create_token(Env& env, std::vector<std::string> args) {
  args.insert(args.begin(), {"tokens", "create"});
  const auto result = env.cli(args);
  expect(result.code == 0, "dagmesh tokens create failed (" + std::to_string(result.code) + "):\n" +
                               result.out + tail(read_file(env.cli_err())));
  const auto at = result.out.find("dmt_");
  expect(at != std::string::npos, "no dmt_ token in the output of tokens create:\n" + result.out);
  auto end = at;
  while (end < result.out.size() && (std::isalnum(static_cast<unsigned char>(result.out[end])) ||
                                     result.out[end] == '_' || result.out[end] == '-')) {
    ++end;
  }
  return result.out.substr(at, end - at);
}

/// The worker exits 2 within 20 s (no silent retry loop), its log naming `code` once.
void expect_refused(Env& env, Child& worker, const std::string& code) {
  const auto exit_code = wait_exit(worker, seconds(20));
  expect(exit_code.has_value(), worker.name + " still running: refused credentials were retried\n" +
                                    env.diagnostics());
  expect(*exit_code == 2, worker.name + " exit code " + std::to_string(*exit_code) + ", want 2\n" +
                              env.diagnostics());
  const auto err = read_file(worker.err);
  expect(err.find("error dagmesh: the executor ") != std::string::npos &&
             err.find("(" + code + "): ") != std::string::npos,
         worker.name + " did not log the refusal (" + code + ") at ERROR:\n" + err);
  expect(err.find("retrying") == std::string::npos && err.find("reconnecting") == std::string::npos,
         worker.name + " retried refused credentials:\n" + err);
  log(worker.name + " refused with " + code + ", exit 2");
}

/// The worker stays up but never connects for `window`; the log shows the failed attempts.
/// Then SIGTERM drains it (exit 0).
void expect_never_connects(Env& env, Child& worker, const std::string& in_log, milliseconds window) {
  const auto until = Clock::now() + window;
  while (Clock::now() < until) {
    expect(alive(worker), worker.name + " exited:\n" + tail(read_file(worker.err)));
    expect(!env.connected(worker.name), worker.name + " connected\n" + env.diagnostics());
    std::this_thread::sleep_for(milliseconds(250));
  }
  const auto err = read_file(worker.err);
  expect(err.find("cannot open a stream") != std::string::npos &&
             err.find(in_log) != std::string::npos,
         worker.name + " log does not show the failed handshake (\"" + in_log + "\"):\n" + tail(err));
  kill_child(worker, SIGTERM);
  const auto code = wait_exit(worker, seconds(20));
  expect(code && *code == 0, worker.name + " did not drain while offline\n" + env.diagnostics());
  log(worker.name + " never connected (" + in_log + ")");
}

/// TLS with the admin token: a worker configured by the environment (DAGMESH_TOKEN,
/// DAGMESH_TLS_CA) and one by flags (--token, --tls-ca, --tls-server-name localhost) each run a
/// step over https; a worker that trusts only the system roots never connects and says why.
void scenario_tls(Env& env) {
  const auto certs = make_certs(env);
  env.use_tls(certs, false);
  env.start_server();
  expect(!env.admin_token.empty(), "dagmesh up wrote no " + env.data_dir() + "/admin.token");
  env.start_conformance("cpp-conf-tls-env", 1);
  env.start_conformance("cpp-conf-tls-flags", 1,
                        {{"DAGMESH_TOKEN", std::nullopt}, {"DAGMESH_TLS_CA", std::nullopt}},
                        {"--token", env.admin_token, "--tls-ca", certs + "/ca.pem",
                         "--tls-server-name", "localhost"});
  env.wait_workers({"cpp-conf-tls-env", "cpp-conf-tls-flags"});
  // Two 1.5 s steps at once on two 1-slot workers: one each.
  const auto id = env.submit("tls", R"(name: cpp-e2e-tls
steps:
  - id: a
    task: conformance.sleep@^1
    inputs: { ms: "1500" }
  - id: b
    task: conformance.sleep@^1
    inputs: { ms: "1500" }
)");
  const auto run = env.wait_run(id);
  expect_state(run, "RUN_STATE_SUCCEEDED", env);
  const auto a = Env::step(run, "a").value("worker", "");
  const auto b = Env::step(run, "b").value("worker", "");
  expect(a != b && (a == "cpp-conf-tls-env" || a == "cpp-conf-tls-flags") &&
             (b == "cpp-conf-tls-env" || b == "cpp-conf-tls-flags"),
         "steps ran on " + a + " and " + b);

  auto& untrusting = env.start_conformance("cpp-conf-tls-system-roots", 1,
                                           {{"DAGMESH_TLS_CA", std::nullopt}});
  expect_never_connects(env, untrusting, "certificate verify failed", milliseconds(3000));

  // http:// to the TLS port: with DAGMESH_TLS_CA still set, a settings error before dialling;
  // without, plaintext that never connects and a hint.
  const std::string plain_url = "http://127.0.0.1:" + std::to_string(env.port);
  auto& mixed = env.start_worker("cpp-conf-tls-http-url", {env.conformance, "--server", plain_url,
                                                          "--instance-id", "cpp-conf-tls-http-url"});
  const auto mixed_code = wait_exit(mixed, seconds(20));
  expect(mixed_code && *mixed_code == 2 &&
             read_file(mixed.err).find("DAGMESH_TLS_CA is set but the server URL") != std::string::npos &&
             read_file(mixed.err).find("TLS settings need an https:// server URL") != std::string::npos,
         "a TLS setting with an http:// URL was not refused:\n" + read_file(mixed.err));
  auto& plain = env.start_worker("cpp-conf-tls-plaintext",
                                 {env.conformance, "--server", plain_url, "--instance-id",
                                  "cpp-conf-tls-plaintext"},
                                 {{"DAGMESH_TLS_CA", std::nullopt}});
  expect_never_connects(env, plain, "use an https:// URL", milliseconds(2000));
}

/// Refused credentials end the worker (exit 2, the server's message at ERROR, no retry loop):
/// no token, a bad token (UNAUTHENTICATED), a worker token whose task patterns do not cover
/// the worker's task types (PERMISSION_DENIED). A token whose patterns do cover them works.
void scenario_auth_refused(Env& env) {
  env.start_server();
  expect(!env.admin_token.empty(), "dagmesh up wrote no " + env.data_dir() + "/admin.token");
  auto& none = env.start_conformance("cpp-conf-no-token", 1, {{"DAGMESH_TOKEN", std::nullopt}});
  // The admin token with its last character changed: well formed, wrong secret.
  std::string wrong = env.admin_token;
  wrong.back() = wrong.back() == 'a' ? 'b' : 'a';
  auto& bad = env.start_conformance("cpp-conf-bad-token", 1, {{"DAGMESH_TOKEN", wrong}});
  auto& garbage = env.start_conformance("cpp-conf-garbage-token", 1,
                                        {{"DAGMESH_TOKEN", "not-a-dagmesh-token"}});
  expect_refused(env, none, "UNAUTHENTICATED");
  expect(read_file(none.err).find("no token given") != std::string::npos,
         "no hint about the missing token:\n" + read_file(none.err));
  expect_refused(env, bad, "UNAUTHENTICATED");
  expect_refused(env, garbage, "UNAUTHENTICATED");

  const auto narrow = create_token(env, {"--scope", "worker", "--task", "other.*", "--name",
                                         "cpp-e2e-narrow"});
  auto& denied = env.start_conformance("cpp-conf-narrow", 1, {{"DAGMESH_TOKEN", narrow}});
  expect_refused(env, denied, "PERMISSION_DENIED");

  const auto scoped = create_token(env, {"--scope", "worker", "--task", "conformance.*",
                                         "--name", "cpp-e2e-scoped"});
  // From a token file this time.
  const std::string token_file = env.dir + "/scoped.token";
  std::ofstream(token_file) << scoped << "\n";
  auto& ok = env.start_conformance("cpp-conf-scoped", 1,
                                   {{"DAGMESH_TOKEN", std::nullopt}, {"DAGMESH_TOKEN_FILE", token_file}});
  env.wait_workers({"cpp-conf-scoped"});
  expect_state(env.echo_run("scoped"), "RUN_STATE_SUCCEEDED", env);
  expect(read_file(ok.err).find("token from DAGMESH_TOKEN_FILE") != std::string::npos,
         "the scoped worker did not use the token file");
}

/// mTLS (`dagmesh up --tls-client-ca`): workers with the client certificate (environment or
/// flags) connect and run a step; one without never connects.
void scenario_mtls(Env& env) {
  const auto certs = make_certs(env);
  env.use_tls(certs, true);
  env.start_server();
  env.start_conformance("cpp-conf-mtls", 1);
  env.start_conformance("cpp-conf-mtls-flags", 1,
                        {{"DAGMESH_TLS_CLIENT_CERT", std::nullopt},
                         {"DAGMESH_TLS_CLIENT_KEY", std::nullopt}},
                        {"--tls-client-cert", certs + "/client.pem", "--tls-client-key",
                         certs + "/client.key"});
  env.wait_workers({"cpp-conf-mtls", "cpp-conf-mtls-flags"});
  expect_state(env.echo_run("mtls"), "RUN_STATE_SUCCEEDED", env);

  auto& no_cert = env.start_conformance("cpp-conf-mtls-no-cert", 1,
                                        {{"DAGMESH_TLS_CLIENT_CERT", std::nullopt},
                                         {"DAGMESH_TLS_CLIENT_KEY", std::nullopt}});
  // The log points at the missing client certificate.
  expect_never_connects(env, no_cert, "check tls_client_cert", milliseconds(3000));
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void(Env&)>> scenarios = {
      {"workflow", scenario_workflow},     {"payload_limit", scenario_payload_limit},
      {"cancel", scenario_cancel},         {"drain", scenario_drain},
      {"reconnect", scenario_reconnect},   {"rejected", scenario_rejected},
      {"executor_drain", scenario_executor_drain},
      {"stop_during_executor_drain", scenario_stop_during_executor_drain},
      {"tls", scenario_tls},               {"auth_refused", scenario_auth_refused},
      {"mtls", scenario_mtls}};
  if (argc != 2 || scenarios.count(argv[1]) == 0) {
    std::cerr << "usage: dagmesh_e2e_test workflow|payload_limit|cancel|drain|reconnect|rejected|"
                 "executor_drain|stop_during_executor_drain|tls|auth_refused|mtls\n";
    return 2;
  }
  const std::string name = argv[1];
  const bool required = env_or("DAGMESH_E2E_REQUIRED", "0") == "1";

  Env env;
  env.dagmesh = env_or("DAGMESH_BIN", DAGMESH_BIN_DEFAULT);
  env.conformance = DAGMESH_CONFORMANCE_WORKER;
  env.gpu_tool = env_or("DAGMESH_GPU_TOOL_WORKER", DAGMESH_GPU_TOOL_WORKER_DEFAULT);
  std::vector<std::string> needed = {env.dagmesh, env.conformance};
  if (name == "workflow") needed.push_back(env.gpu_tool);
  for (const auto& path : needed) {
    if (!executable(path)) {
      std::cerr << "[e2e] missing executable " << path
                << " (set DAGMESH_BIN / DAGMESH_GPU_TOOL_WORKER)\n";
      return required ? 1 : 77;
    }
  }

  char dir_template[] = "/tmp/dagmesh-cpp-e2e-XXXXXX";
  if (::mkdtemp(dir_template) == nullptr) {
    std::perror("mkdtemp");
    return 1;
  }
  env.dir = dir_template;
  env.port = free_port();
  env.init();
  log("scenario " + name + " in " + env.dir);

  int code = 0;
  try {
    scenarios.at(name)(env);
    log("PASS " + name);
  } catch (const Skip& e) {
    std::cerr << "[e2e] SKIP " << name << ": " << e.what() << "\n";
    code = required ? 1 : 77;
  } catch (const std::exception& e) {
    std::cerr << "[e2e] FAIL " << name << ": " << e.what() << "\n";
    std::cerr << env.diagnostics() << "\n";
    code = 1;
  }
  cleanup_children();
  if (code == 0 && env_or("DAGMESH_E2E_KEEP", "0") != "1") {
    const std::string rm = "rm -rf '" + env.dir + "'";
    [[maybe_unused]] int ignored = std::system(rm.c_str());
  } else {
    std::cerr << "[e2e] logs kept in " << env.dir << "\n";
  }
  return code;
}
