// Unit tests of the dagmesh C++ SDK: Struct <-> JSON, the payload size check, TaskContext,
// Worker registration, bounds on what an executor sends, resolution of the security settings,
// W3C traceparent parsing. Run one group:
// dagmesh_unit_tests json|payload|bounds|context|trace|worker|security.

#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <iterator>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "dagmesh/dagmesh.hpp"

namespace {

int failures = 0;

#define CHECK(cond)                                                         \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, \
                   #cond);                                                  \
      ++failures;                                                           \
    }                                                                       \
  } while (0)

#define CHECK_EQ(a, b)                                                                        \
  do {                                                                                        \
    const auto va_ = (a);                                                                     \
    const auto vb_ = (b);                                                                     \
    if (!(va_ == vb_)) {                                                                      \
      std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s\n", __FILE__, __LINE__, #a, #b); \
      ++failures;                                                                             \
    }                                                                                         \
  } while (0)

template <typename E, typename F>
bool throws(F&& f) {
  try {
    f();
  } catch (const E&) {
    return true;
  } catch (...) {
    return false;
  }
  return false;
}

using nlohmann::json;

void test_json() {
  // Round trip of nested JSON, numbers as in the Rust SDK: whole numbers stay integers.
  const json doc = {{"room", "kitchen"},
                    {"count", 3},
                    {"negative", -17},
                    {"ratio", 0.25},
                    {"ok", true},
                    {"none", nullptr},
                    {"images", {"a.jpg", "b.jpg"}},
                    {"meta", {{"depth", {1, 2.5}}, {"empty", json::object()}, {"list", json::array()}}}};
  const auto s = dagmesh::json_to_struct(doc);
  CHECK_EQ(s.fields().size(), 8u);
  CHECK(s.fields().at("count").has_number_value() || s.fields().at("count").kind_case() ==
                                                          google::protobuf::Value::kNumberValue);
  CHECK_EQ(s.fields().at("count").number_value(), 3.0);
  CHECK_EQ(s.fields().at("none").kind_case(), google::protobuf::Value::kNullValue);
  CHECK_EQ(s.fields().at("images").list_value().values_size(), 2);
  const json back = dagmesh::struct_to_json(s);
  CHECK_EQ(back, doc);
  CHECK(back["count"].is_number_integer());
  CHECK(back["ratio"].is_number_float());

  // Wire round trip (serialize, parse) keeps it too.
  google::protobuf::Struct parsed;
  CHECK(parsed.ParseFromString(s.SerializeAsString()));
  CHECK_EQ(dagmesh::struct_to_json(parsed), doc);

  // Non-objects are wrapped as {"value": ...}; null is the empty object.
  CHECK_EQ(dagmesh::struct_to_json(dagmesh::json_to_struct(json(5))), (json{{"value", 5}}));
  CHECK_EQ(dagmesh::struct_to_json(dagmesh::json_to_struct(json::array({1, "a"}))),
           (json{{"value", {1, "a"}}}));
  CHECK_EQ(dagmesh::struct_to_json(dagmesh::json_to_struct(json(nullptr))), json::object());
  CHECK_EQ(dagmesh::struct_to_json(google::protobuf::Struct()), json::object());

  // Numbers: 2^53 boundary, unsigned, floats that are whole, non-finite.
  google::protobuf::Value v;
  v.set_number_value(9007199254740991.0);
  CHECK(dagmesh::value_to_json(v).is_number_integer());
  v.set_number_value(9007199254740992.0 * 4);
  CHECK(dagmesh::value_to_json(v).is_number_float());
  v.set_number_value(2.0);
  CHECK_EQ(dagmesh::value_to_json(v), json(2));
  v.set_number_value(std::nan(""));
  CHECK(dagmesh::value_to_json(v).is_null());
  v.set_number_value(INFINITY);
  CHECK(dagmesh::value_to_json(v).is_null());
  CHECK_EQ(dagmesh::json_to_value(json(std::uint64_t{18446744073709551615ull})).number_value(),
           18446744073709551615.0);
  CHECK_EQ(dagmesh::json_to_value(json(1.5)).number_value(), 1.5);
  // An unset Value reads as null.
  CHECK(dagmesh::value_to_json(google::protobuf::Value()).is_null());
  // Unicode strings survive.
  CHECK_EQ(dagmesh::struct_to_json(dagmesh::json_to_struct(json{{"k", "h\xC3\xA9llo \xE2\x9C\x93"}})),
           (json{{"k", "h\xC3\xA9llo \xE2\x9C\x93"}}));
}

void test_payload() {
  const json small = {{"blob", std::string(100, 'x')}};
  const auto s = dagmesh::json_to_struct(small);
  const std::size_t size = dagmesh::payload_size(s);
  CHECK_EQ(size, s.SerializeAsString().size());
  CHECK(size > 100 && size < 120);
  CHECK(!dagmesh::check_payload_size("t", size, 0).has_value());  // no limit known
  CHECK(!dagmesh::check_payload_size("t", size, size).has_value());  // exactly at the limit
  const auto error = dagmesh::check_payload_size("conformance.big", size, size - 1);
  CHECK(error.has_value());
  CHECK_EQ(*error, "output of \"conformance.big\" is " + std::to_string(size) +
                       " bytes, over the " + std::to_string(size - 1) + "-byte payload limit");
  // A large blob: the encoded size is the string plus a few bytes of framing.
  const auto big = dagmesh::json_to_struct(json{{"blob", std::string(5'000'000, 'x')}});
  CHECK(dagmesh::payload_size(big) > 5'000'000 && dagmesh::payload_size(big) < 5'000'100);
  CHECK(dagmesh::check_payload_size("x", dagmesh::payload_size(big), 4194304).has_value());
}

json nested(std::size_t levels) {
  json value = 1;
  for (std::size_t i = 0; i < levels; ++i) value = json{{"a", value}};
  return value;
}

// What a broken executor sends is bounded: inputs past the limit it announced, or nested past
// the contract's depth, are refused with the size (or the path) and the limit.
void test_bounds() {
  const auto inputs = dagmesh::json_to_struct(json{{"text", std::string(5000, 'x')}});
  const std::size_t size = dagmesh::payload_size(inputs);
  const auto too_big = dagmesh::check_inputs("echo", inputs, 1024);
  CHECK(too_big.has_value());
  if (too_big) {
    CHECK_EQ(*too_big, "inputs of \"echo\" are " + std::to_string(size) +
                           " bytes, over the 1024-byte payload limit");
  }
  CHECK(!dagmesh::check_inputs("echo", inputs, 0).has_value());  // no limit announced
  CHECK(!dagmesh::check_inputs("echo", inputs, size).has_value());

  const auto at_limit = dagmesh::json_to_struct(nested(dagmesh::kMaxPayloadDepth - 1));
  CHECK(!dagmesh::check_depth("inputs", at_limit).has_value());
  const auto deep = dagmesh::json_to_struct(json{{"d", nested(dagmesh::kMaxPayloadDepth)}});
  const auto too_deep = dagmesh::check_inputs("echo", deep, 0);
  CHECK(too_deep.has_value());
  if (too_deep) {
    CHECK(too_deep->rfind("inputs of \"echo\": inputs.d.a.a", 0) == 0);
    CHECK(too_deep->find("nested deeper than the limit of 20 levels") != std::string::npos);
  }
  const auto lists = dagmesh::json_to_struct(json{{"l", json::array({json::array({1})})}});
  const auto in_list = dagmesh::check_depth("p", lists, 2);
  CHECK(in_list.has_value());
  if (in_list) CHECK_EQ(*in_list, std::string("p.l[0]: nested deeper than the limit of 2 levels"));

  const auto deep_out = dagmesh::check_outputs("t", deep, 1 << 20);
  CHECK(deep_out.has_value());
  if (deep_out) CHECK(deep_out->rfind("output of \"t\": outputs.d.a", 0) == 0);
  CHECK(!dagmesh::check_outputs("t", at_limit, 1 << 20).has_value());
}

void test_context() {
  auto ctx = dagmesh::TaskContext::detached("run/step", 2);
  CHECK_EQ(ctx->task_id(), "run/step");
  CHECK_EQ(ctx->attempt(), 2u);
  CHECK(ctx->traceparent().empty());
  CHECK(!ctx->deadline().has_value());

  // Progress keeps only the latest report, clamped.
  ctx->progress(0.2, "first");
  ctx->progress(1.7, "second", {{"triangles", 3.0}});
  auto p = ctx->take_progress();
  CHECK(p.has_value());
  CHECK_EQ(p->message, "second");
  CHECK_EQ(p->fraction, 1.0f);
  CHECK_EQ(p->metrics.at("triangles"), 3.0);
  CHECK(!ctx->take_progress().has_value());
  ctx->progress(-1, "neg");
  CHECK_EQ(ctx->take_progress()->fraction, 0.0f);
  ctx->progress(std::nan(""), "nan");
  CHECK_EQ(ctx->take_progress()->fraction, 0.0f);

  // Progress from many threads at once: safe, and one report remains.
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&ctx, t] {
      for (int i = 0; i < 1000; ++i) ctx->progress(i / 1000.0, "thread " + std::to_string(t));
    });
  }
  for (auto& t : threads) t.join();
  CHECK(ctx->take_progress().has_value());
  CHECK(!ctx->take_progress().has_value());

  // Logs are capped at 1000 lines and the rest counted.
  for (int i = 0; i < 1005; ++i) ctx->debug("line " + std::to_string(i));
  std::uint64_t dropped = 0;
  auto lines = ctx->take_logs(&dropped);
  CHECK_EQ(lines.size(), 1000u);
  CHECK_EQ(dropped, 5u);
  CHECK_EQ(std::string(dagmesh::to_string(lines[0].level)), "debug");
  CHECK_EQ(lines[0].text, "line 0");
  CHECK(ctx->take_logs(&dropped).empty());
  CHECK_EQ(dropped, 0u);

  // Cancellation: flag and wait.
  CHECK(!ctx->cancelled());
  CHECK(!ctx->wait_cancelled(std::chrono::milliseconds(10)));
  std::thread canceller([&ctx] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    ctx->cancel();
  });
  CHECK(ctx->wait_cancelled(std::chrono::seconds(5)));
  canceller.join();
  CHECK(ctx->cancelled());
  CHECK(ctx->cancel_flag().load());

  // TaskError carries retryable.
  dagmesh::TaskError fatal("bad input", false);
  CHECK(!fatal.retryable());
  CHECK_EQ(std::string(fatal.what()), "bad input");
  CHECK(dagmesh::TaskError("busy").retryable());
}

bool contains(const std::string& text, const std::string& part);

// What `fn` writes to stderr (fd 2), through a temporary file.
std::string capture_stderr(const std::function<void()>& fn) {
  char path[] = "/tmp/dagmesh-unit-stderr-XXXXXX";
  const int fd = ::mkstemp(path);
  if (fd < 0) return "<mkstemp failed>";
  std::fflush(stderr);
  const int saved = ::dup(2);
  ::dup2(fd, 2);
  fn();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  ::close(fd);
  std::ifstream in(path);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ::unlink(path);
  return text;
}

std::unique_ptr<dagmesh::TaskContext> context_with_traceparent(const std::string& traceparent) {
  dagmesh::TaskContext::Info info;
  info.task_id = "run/step";
  info.attempt = 3;
  info.traceparent = traceparent;
  return std::make_unique<dagmesh::TaskContext>(std::move(info));
}

void test_trace() {
  const std::string trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
  const std::string span_id = "00f067aa0ba902b7";
  const std::string valid = "00-" + trace_id + "-" + span_id + "-01";

  // Valid, sampled: the parsed fields, on the free function and on the context.
  {
    const auto parsed = dagmesh::parse_traceparent(valid);
    CHECK(parsed.has_value());
    if (parsed) {
      CHECK_EQ(parsed->trace_id, trace_id);
      CHECK_EQ(parsed->parent_span_id, span_id);
      CHECK_EQ(static_cast<int>(parsed->flags), 1);
      CHECK(parsed->sampled());
    }
    auto ctx = context_with_traceparent(valid);
    CHECK_EQ(ctx->traceparent(), valid);
    CHECK_EQ(ctx->trace_id(), trace_id);
    CHECK_EQ(ctx->parent_span_id(), span_id);
    CHECK(ctx->sampled());
  }
  // Flags: only bit 0 means sampled; other bits are carried and ignored.
  {
    auto not_sampled = context_with_traceparent("00-" + trace_id + "-" + span_id + "-00");
    CHECK_EQ(not_sampled->trace_id(), trace_id);
    CHECK_EQ(not_sampled->parent_span_id(), span_id);
    CHECK(!not_sampled->sampled());
    const auto other_bits = dagmesh::parse_traceparent("00-" + trace_id + "-" + span_id + "-fe");
    CHECK(other_bits.has_value());
    if (other_bits) {
      CHECK_EQ(static_cast<int>(other_bits->flags), 0xfe);
      CHECK(!other_bits->sampled());
    }
    const auto sampled_and_more = dagmesh::parse_traceparent("00-" + trace_id + "-" + span_id + "-03");
    CHECK(sampled_and_more.has_value() && sampled_and_more->sampled());
  }
  // No traceparent (tracing off, detached contexts): empty, not sampled.
  {
    auto detached = dagmesh::TaskContext::detached("run/step");
    CHECK(detached->trace_id().empty());
    CHECK(detached->parent_span_id().empty());
    CHECK(!detached->sampled());
    CHECK(!dagmesh::parse_traceparent("").has_value());
  }

  // Every malformed header gives nullopt from the parser and empty values on a context (which
  // still reports the header as sent); none throws.
  const std::string upper_trace = "4BF92F3577B34DA6A3CE929D0E0E4736";
  const std::vector<std::pair<std::string, std::string>> bad = {
      // all-zero ids
      {"zero trace id", "00-00000000000000000000000000000000-" + span_id + "-01"},
      {"zero span id", "00-" + trace_id + "-0000000000000000-01"},
      // uppercase hex anywhere
      {"uppercase trace id", "00-" + upper_trace + "-" + span_id + "-01"},
      {"one uppercase digit", "00-4bf92f3577b34da6a3ce929d0e0e473A-" + span_id + "-01"},
      {"uppercase span id", "00-" + trace_id + "-00F067AA0BA902B7-01"},
      {"uppercase flags", "00-" + trace_id + "-" + span_id + "-0A"},
      // wrong lengths
      {"short trace id", "00-" + trace_id.substr(1) + "-" + span_id + "-01"},
      {"long trace id", "00-" + trace_id + "0-" + span_id + "-01"},
      {"short span id", "00-" + trace_id + "-" + span_id.substr(1) + "-01"},
      {"long span id", "00-" + trace_id + "-" + span_id + "0-01"},
      {"short trace id, long span id", "00-" + trace_id.substr(1) + "-0" + span_id + "-01"},
      {"one-digit flags", "00-" + trace_id + "-" + span_id + "-1"},
      {"three-digit flags", "00-" + trace_id + "-" + span_id + "-001"},
      {"truncated", valid.substr(0, 54)},
      {"extra field", valid + "-what"},
      // versions other than 00
      {"version 01", "01-" + trace_id + "-" + span_id + "-01"},
      {"version ff", "ff-" + trace_id + "-" + span_id + "-01"},
      {"version 0", "0-" + trace_id + "-" + span_id + "-010"},
      // separators, characters, whitespace
      {"underscores", "00_" + trace_id + "_" + span_id + "_01"},
      {"non-hex", "00-" + trace_id.substr(0, 31) + "g-" + span_id + "-01"},
      {"dash inside the trace id", "00-" + trace_id.substr(0, 31) + "--" + span_id + "-01"},
      {"leading space", " " + valid.substr(1)},
      {"trailing space", valid + " "},
      {"leading space, 55 chars", " 0-" + trace_id + "-" + span_id + "-01"},
      {"nul byte", std::string("00-") + trace_id.substr(0, 31) + std::string(1, '\0') + "-" +
                       span_id + "-01"},
      {"garbage", "not a traceparent"},
      {"dashes only", std::string(55, '-')},
  };
  for (const auto& [what, header] : bad) {
    bool threw = false;
    std::optional<dagmesh::TraceParent> parsed;
    std::unique_ptr<dagmesh::TaskContext> ctx;
    try {
      parsed = dagmesh::parse_traceparent(header);
      ctx = context_with_traceparent(header);
    } catch (...) {
      threw = true;
    }
    if (threw || parsed.has_value() || ctx == nullptr || !ctx->trace_id().empty() ||
        !ctx->parent_span_id().empty() || ctx->sampled() || ctx->traceparent() != header) {
      std::fprintf(stderr, "%s:%d: malformed traceparent accepted or mishandled: %s: \"%s\"\n",
                   __FILE__, __LINE__, what.c_str(), header.c_str());
      ++failures;
    }
  }

  // The context's stderr echo names the trace id when there is one, and only then.
  {
    auto traced = context_with_traceparent(valid);
    const auto with = capture_stderr([&] { traced->warn("traced line"); });
    CHECK(contains(with, "[run/step#3 trace_id=" + trace_id + "] traced line"));
    auto untraced = context_with_traceparent("00-" + upper_trace + "-" + span_id + "-01");
    const auto without = capture_stderr([&] { untraced->warn("untraced line"); });
    CHECK(contains(without, "[run/step#3] untraced line"));
    CHECK(without.find("trace_id=") == std::string::npos);
    // The line sent to the executor is the handler's text alone.
    const auto logs = traced->take_logs();
    CHECK_EQ(logs.size(), 1u);
    if (!logs.empty()) CHECK_EQ(logs[0].text, "traced line");
  }
}

void test_worker() {
  auto noop = [](dagmesh::TaskContext&, const json&) { return json::object(); };
  dagmesh::WorkerOptions options;
  options.name = "mesher";
  dagmesh::Worker worker(options);
  const std::string id = worker.instance_id();
  CHECK(id.rfind("mesher-", 0) == 0);
  CHECK_EQ(id.size(), std::string("mesher-").size() + 12);
  CHECK_EQ(worker.name(), "mesher");

  CHECK(throws<std::invalid_argument>([&] { worker.task("t", "1.x", noop); }));
  CHECK(throws<std::invalid_argument>([&] { worker.task("", "1.0.0", noop); }));
  CHECK(throws<std::invalid_argument>([&] { worker.task("t", "1.0.0", nullptr); }));
  worker.task("t", "1.0.0", noop).task("t", "2.0.0-rc.1+build.5", noop);
  CHECK(throws<std::invalid_argument>([&] { worker.task("t", "1.0.0", noop); }));

  // Explicit instance ids are kept; an unnamed worker is named after the executable.
  dagmesh::WorkerOptions explicit_id;
  explicit_id.instance_id = "fixed-1";
  dagmesh::Worker named(explicit_id);
  CHECK_EQ(named.instance_id(), "fixed-1");
  CHECK_EQ(named.name(), "dagmesh_unit_tests");

  // No task types: run() refuses without dialing.
  dagmesh::Worker empty(options);
  CHECK_EQ(empty.run(false), dagmesh::kRejected);
  CHECK(!empty.last_error().empty());

  // A drain before run() returns at once, without a server.
  dagmesh::WorkerOptions unreachable;
  unreachable.server = "http://127.0.0.1:1";
  dagmesh::Worker drained(unreachable);
  drained.task("t", "1.0.0", noop);
  drained.drain();
  CHECK_EQ(drained.run(false), dagmesh::kDrained);
  CHECK(throws<std::logic_error>([&] { drained.task("u", "1.0.0", noop); }));
  CHECK(throws<std::logic_error>([&] { drained.run(false); }));

  // Unreachable executor: keeps retrying (never connected) until drained.
  dagmesh::Worker retrying(unreachable);
  retrying.task("t", "1.0.0", noop);
  std::thread stopper([&retrying] {
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
    retrying.drain();
  });
  const auto start = std::chrono::steady_clock::now();
  CHECK_EQ(retrying.run(false), dagmesh::kDrained);
  stopper.join();
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(5));
  CHECK(!retrying.state().connected);
  CHECK_EQ(retrying.state().sessions, 0u);

  // abort() stops it too, with kAborted.
  dagmesh::Worker aborted(unreachable);
  aborted.task("t", "1.0.0", noop);
  std::thread aborter([&aborted] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    aborted.abort();
  });
  CHECK_EQ(aborted.run(false), dagmesh::kAborted);
  aborter.join();
  CHECK(!aborted.last_error().empty());
}

// --- security settings ------------------------------------------------------------------------

const char* const kSecurityVariables[] = {"DAGMESH_TOKEN",           "DAGMESH_TOKEN_FILE",
                                          "DAGMESH_TLS_CA",          "DAGMESH_TLS_CLIENT_CERT",
                                          "DAGMESH_TLS_CLIENT_KEY", "DAGMESH_TLS_SERVER_NAME"};

void clear_security_env() {
  for (const char* name : kSecurityVariables) ::unsetenv(name);
}

/// The message of the std::invalid_argument `f` throws; "<no throw>" or "<other>" otherwise.
template <typename F>
std::string invalid_argument_message(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return e.what();
  } catch (...) {
    return "<other>";
  }
  return "<no throw>";
}

bool contains(const std::string& text, const std::string& part) {
  if (text.find(part) != std::string::npos) return true;
  std::fprintf(stderr, "  \"%s\" does not contain \"%s\"\n", text.c_str(), part.c_str());
  return false;
}

std::string write_file(const std::string& path, const std::string& content) {
  std::ofstream(path, std::ios::binary) << content;
  return path;
}

void test_security() {
  clear_security_env();
  char dir_template[] = "/tmp/dagmesh-unit-XXXXXX";
  CHECK(::mkdtemp(dir_template) != nullptr);
  const std::string dir = dir_template;
  const std::string cert_pem =
      "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
  const std::string key_pem = "-----BEGIN PRIVATE KEY-----\nMIGH\n-----END PRIVATE KEY-----\n";
  const std::string ca = write_file(dir + "/ca.pem", cert_pem);
  const std::string cert = write_file(dir + "/client.pem", cert_pem + cert_pem);
  const std::string key = write_file(dir + "/client.key", key_pem);
  const std::string token_file = write_file(dir + "/token", "  dmt_file_secret\n\n");
  const std::string missing = dir + "/missing.pem";
  const auto resolve = [](const dagmesh::WorkerOptions& o) { return dagmesh::resolve_connection(o); };

  // Defaults: plaintext, no token; the target is the URL without scheme and path.
  {
    dagmesh::WorkerOptions o;
    const auto c = resolve(o);
    CHECK_EQ(c.target, "127.0.0.1:7070");
    CHECK(!c.tls);
    CHECK(c.token.empty());
    CHECK(c.token_source.empty());
    o.server = "https://mesh.example.com:7443/";
    CHECK_EQ(resolve(o).target, "mesh.example.com:7443");
    CHECK(resolve(o).tls);
    CHECK(resolve(o).pem_root_certs.empty());  // the system roots
    o.server = "localhost:7070";
    CHECK_EQ(resolve(o).target, "localhost:7070");
    CHECK(!resolve(o).tls);
  }

  // The token: an option wins over DAGMESH_TOKEN; the variable is used when the option is
  // empty; a token may go over plaintext.
  {
    dagmesh::WorkerOptions o;
    ::setenv("DAGMESH_TOKEN", "dmt_env_secret", 1);
    CHECK_EQ(resolve(o).token, "dmt_env_secret");
    CHECK_EQ(resolve(o).token_source, "DAGMESH_TOKEN");
    o.token = "dmt_option_secret";
    CHECK_EQ(resolve(o).token, "dmt_option_secret");
    CHECK_EQ(resolve(o).token_source, "token");
    // DAGMESH_TOKEN beats DAGMESH_TOKEN_FILE; an explicit token_file beats DAGMESH_TOKEN.
    o.token.clear();
    ::setenv("DAGMESH_TOKEN_FILE", missing.c_str(), 1);
    CHECK_EQ(resolve(o).token, "dmt_env_secret");
    o.token_file = token_file;
    CHECK_EQ(resolve(o).token, "dmt_file_secret");  // trimmed
    CHECK_EQ(resolve(o).token_source, "token_file " + token_file);
    // An explicit token beats an explicit token_file.
    o.token = "dmt_option_secret";
    o.token_file = missing;
    CHECK_EQ(resolve(o).token, "dmt_option_secret");
    clear_security_env();
  }
  {
    // DAGMESH_TOKEN_FILE when no token is given.
    dagmesh::WorkerOptions o;
    ::setenv("DAGMESH_TOKEN_FILE", token_file.c_str(), 1);
    CHECK_EQ(resolve(o).token, "dmt_file_secret");
    CHECK_EQ(resolve(o).token_source, "DAGMESH_TOKEN_FILE " + token_file);
    // Unreadable: the message names the variable and the file.
    ::setenv("DAGMESH_TOKEN_FILE", missing.c_str(), 1);
    auto message = invalid_argument_message([&] { resolve(o); });
    CHECK(contains(message, "DAGMESH_TOKEN_FILE"));
    CHECK(contains(message, missing));
    CHECK(contains(message, "No such file"));
    // The Worker constructor checks the same.
    CHECK(contains(invalid_argument_message([&] { dagmesh::Worker w(o); }), missing));
    clear_security_env();
    o.token_file = dir;  // a directory
    CHECK(contains(invalid_argument_message([&] { resolve(o); }), "token_file file " + dir));
    o.token_file = write_file(dir + "/blank", " \n\t\n");
    message = invalid_argument_message([&] { resolve(o); });
    CHECK(contains(message, "token_file file " + dir + "/blank"));
    CHECK(contains(message, "empty"));
    o.token_file.clear();
    o.token = "dmt_a\nb";
    CHECK(contains(invalid_argument_message([&] { resolve(o); }), "gRPC header"));
    o.token = "  dmt_padded \n";
    CHECK_EQ(resolve(o).token, "dmt_padded");
    o.token = " ";
    CHECK(contains(invalid_argument_message([&] { resolve(o); }), "token is blank"));
  }

  // TLS settings need an https:// URL, whether from options or the environment.
  {
    dagmesh::WorkerOptions o;
    o.server = "http://127.0.0.1:7070";
    o.tls_ca = ca;
    auto message = invalid_argument_message([&] { resolve(o); });
    CHECK(contains(message, "tls_ca"));
    CHECK(contains(message, "TLS settings need an https:// server URL"));
    CHECK(contains(invalid_argument_message([&] { dagmesh::Worker w(o); }),
                   "TLS settings need an https:// server URL"));
    o.tls_ca.clear();
    ::setenv("DAGMESH_TLS_SERVER_NAME", "mesh.internal", 1);
    message = invalid_argument_message([&] { resolve(o); });
    CHECK(contains(message, "DAGMESH_TLS_SERVER_NAME"));
    CHECK(contains(message, "TLS settings need an https:// server URL"));
    clear_security_env();
    o.server = "127.0.0.1:7070";  // no scheme: plaintext too
    o.tls_client_cert = cert;
    o.tls_client_key = key;
    CHECK(contains(invalid_argument_message([&] { resolve(o); }), "need an https://"));
  }

  // https: the files are read; the options win over the variables.
  {
    dagmesh::WorkerOptions o;
    o.server = "https://127.0.0.1:7443";
    ::setenv("DAGMESH_TLS_CA", ca.c_str(), 1);
    ::setenv("DAGMESH_TLS_SERVER_NAME", "mesh.internal", 1);
    ::setenv("DAGMESH_TOKEN", "dmt_env_secret", 1);
    auto c = resolve(o);
    CHECK(c.tls);
    CHECK_EQ(c.target, "127.0.0.1:7443");
    CHECK_EQ(c.pem_root_certs, cert_pem);
    CHECK_EQ(c.tls_server_name, "mesh.internal");
    CHECK_EQ(c.token, "dmt_env_secret");
    CHECK(c.pem_cert_chain.empty() && c.pem_private_key.empty());
    o.tls_server_name = "localhost";
    o.tls_client_cert = cert;
    ::setenv("DAGMESH_TLS_CLIENT_KEY", key.c_str(), 1);
    c = resolve(o);
    CHECK_EQ(c.tls_server_name, "localhost");
    CHECK_EQ(c.pem_cert_chain, cert_pem + cert_pem);
    CHECK_EQ(c.pem_private_key, key_pem);
    // An option naming an unreadable file: the message names the option and the file.
    o.tls_ca = missing;
    auto message = invalid_argument_message([&] { resolve(o); });
    CHECK(contains(message, "tls_ca file " + missing));
    ::setenv("DAGMESH_TLS_CA", missing.c_str(), 1);
    o.tls_ca.clear();
    CHECK(contains(invalid_argument_message([&] { resolve(o); }), "DAGMESH_TLS_CA file " + missing));
    o.tls_ca = key;  // not a certificate
    message = invalid_argument_message([&] { resolve(o); });
    CHECK(contains(message, "tls_ca file " + key));
    CHECK(contains(message, "no PEM certificate"));
    o.tls_ca = ca;
    o.tls_client_key = cert;  // not a key
    CHECK(contains(invalid_argument_message([&] { resolve(o); }), "tls_client_key file " + cert));
    clear_security_env();
  }

  // A client certificate without its key, or the reverse.
  {
    dagmesh::WorkerOptions o;
    o.server = "https://127.0.0.1:7443";
    o.tls_client_cert = cert;
    auto message = invalid_argument_message([&] { resolve(o); });
    CHECK(contains(message, "tls_client_cert is set without tls_client_key"));
    CHECK(contains(message, "DAGMESH_TLS_CLIENT_KEY"));
    o.tls_client_cert.clear();
    ::setenv("DAGMESH_TLS_CLIENT_KEY", key.c_str(), 1);
    message = invalid_argument_message([&] { resolve(o); });
    CHECK(contains(message, "DAGMESH_TLS_CLIENT_KEY is set without tls_client_cert"));
    CHECK(contains(invalid_argument_message([&] { dagmesh::Worker w(o); }), "without"));
    ::setenv("DAGMESH_TLS_CLIENT_CERT", cert.c_str(), 1);
    CHECK_EQ(resolve(o).pem_private_key, key_pem);
    clear_security_env();
  }

  // Good settings construct a worker; nothing is dialled until run().
  {
    dagmesh::WorkerOptions o;
    o.server = "https://127.0.0.1:1";
    o.tls_ca = ca;
    o.token_file = token_file;
    dagmesh::Worker worker(o);
    CHECK_EQ(worker.state().sessions, 0u);
  }

  const std::string rm = "rm -rf '" + dir + "'";
  CHECK(std::system(rm.c_str()) == 0);
}

}  // namespace

int main(int argc, char** argv) {
  const std::map<std::string, std::function<void()>> groups = {
      {"json", test_json},       {"payload", test_payload}, {"bounds", test_bounds},
      {"context", test_context}, {"trace", test_trace},     {"worker", test_worker},
      {"security", test_security}};
  int ran = 0;
  for (const auto& [name, fn] : groups) {
    if (argc > 1 && name != argv[1]) continue;
    std::fprintf(stderr, "== %s\n", name.c_str());
    fn();
    ++ran;
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
