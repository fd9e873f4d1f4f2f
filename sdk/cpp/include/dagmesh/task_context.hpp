#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dagmesh {

namespace detail {
struct ContextAccess;
}

/// Severity of a task log line (`LogLine.level`: "debug", "info", "warn", "error").
enum class LogLevel { Debug, Info, Warn, Error };

const char* to_string(LogLevel level) noexcept;

/// A parsed W3C trace context header (https://www.w3.org/TR/trace-context/#traceparent-header).
struct TraceParent {
  /// 32 lowercase hex digits, not all zero.
  std::string trace_id;
  /// The executor's attempt span: 16 lowercase hex digits, not all zero.
  std::string parent_span_id;
  /// The trace-flags byte; bit 0 is "sampled".
  std::uint8_t flags = 0;

  bool sampled() const noexcept { return (flags & 0x01) != 0; }
};

/// Parses a `traceparent` strictly: version `00`, then exactly
/// `-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>` (55 characters, lowercase hex
/// only, no surrounding whitespace), neither id all zeros. Anything else (other versions
/// included) gives std::nullopt; no input makes it throw.
std::optional<TraceParent> parse_traceparent(std::string_view header);

/// What a running attempt knows about itself, plus progress, logs and cancellation.
///
/// A handler gets it by reference; it stays valid for the whole call. Every member function is
/// thread-safe: hand the context to the threads a handler starts (it must not outlive the
/// handler's return, though). Progress and logs never block and never throw: they land in
/// per-task buffers that the worker's stream thread forwards (progress keeps only the latest
/// report while the stream is busy or down, logs are batched every 100 ms).
class TaskContext {
 public:
  /// Who the attempt is: everything Assign says about it.
  struct Info {
    std::string task_id;
    std::uint32_t attempt = 1;
    std::string run_id;
    std::string step_id;
    std::string task_type;
    std::string task_version;
    std::string traceparent;
    std::optional<std::chrono::system_clock::time_point> deadline;
  };

  explicit TaskContext(Info info);
  TaskContext(const TaskContext&) = delete;
  TaskContext& operator=(const TaskContext&) = delete;

  /// A context attached to no worker, for unit-testing handlers: progress and logs are only
  /// buffered, and cancel() simulates the executor's Cancel.
  static std::unique_ptr<TaskContext> detached(std::string task_id, std::uint32_t attempt = 1);

  /// Stable id of the step's task across attempts ("<run_id>/<step_id>").
  const std::string& task_id() const noexcept { return info_.task_id; }
  /// 1 for the first attempt, 2 for the first retry...
  std::uint32_t attempt() const noexcept { return info_.attempt; }
  const std::string& run_id() const noexcept { return info_.run_id; }
  const std::string& step_id() const noexcept { return info_.step_id; }
  /// The task type being run, e.g. "mesh.smooth".
  const std::string& task_type() const noexcept { return info_.task_type; }
  /// The version of the task type the executor chose (one this worker registered).
  const std::string& task_version() const noexcept { return info_.task_version; }
  /// W3C trace context of the attempt's span, as sent; empty when the executor has tracing off.
  const std::string& traceparent() const noexcept { return info_.traceparent; }
  /// The trace id of traceparent() (32 lowercase hex digits); empty when traceparent() is
  /// empty or malformed (see parse_traceparent()).
  const std::string& trace_id() const noexcept { return trace_.trace_id; }
  /// The executor's attempt span, parent of spans the handler starts (16 lowercase hex digits);
  /// empty when traceparent() is empty or malformed.
  const std::string& parent_span_id() const noexcept { return trace_.parent_span_id; }
  /// Whether the executor sampled the trace (trace-flags bit 0); false when traceparent() is
  /// empty or malformed.
  bool sampled() const noexcept { return trace_.sampled(); }
  /// When the executor times the attempt out (and sends Cancel); empty without a timeout.
  const std::optional<std::chrono::system_clock::time_point>& deadline() const noexcept {
    return info_.deadline;
  }

  /// Whether the executor cancelled this attempt (run cancelled, deadline passed, task moved).
  /// Its result will be discarded: stop as soon as convenient. Cheap; poll it from hot loops.
  bool cancelled() const noexcept { return cancelled_.load(std::memory_order_acquire); }
  /// The flag behind cancelled(), for code that takes a `const std::atomic<bool>&`.
  const std::atomic<bool>& cancel_flag() const noexcept { return cancelled_; }
  /// Blocks until the attempt is cancelled or `timeout` passes; true if cancelled.
  bool wait_cancelled(std::chrono::milliseconds timeout) const;
  /// Marks the attempt cancelled (what the executor's Cancel does). For tests.
  void cancel();

  /// Reports progress, `fraction` in 0..1 (clamped; NaN reads as 0). Never blocks: while the
  /// stream is busy only the latest report is kept.
  void progress(double fraction, std::string message = {});
  /// progress() with numeric metrics, e.g. {{"vertices", 120000}}.
  void progress(double fraction, std::string message, std::map<std::string, double> metrics);

  /// Appends a line to the step's log (batched; at most 1000 lines wait per task, beyond that
  /// lines are counted and dropped) and echoes it to the worker's stderr log.
  void log(LogLevel level, std::string text);
  void debug(std::string text) { log(LogLevel::Debug, std::move(text)); }
  void info(std::string text) { log(LogLevel::Info, std::move(text)); }
  void warn(std::string text) { log(LogLevel::Warn, std::move(text)); }
  void error(std::string text) { log(LogLevel::Error, std::move(text)); }

  /// The latest progress report not yet sent, if any (used by the worker; handy in tests).
  struct Progress {
    float fraction = 0;
    std::string message;
    std::map<std::string, double> metrics;
  };
  struct LogRecord {
    std::chrono::system_clock::time_point at;
    LogLevel level = LogLevel::Info;
    std::string text;
  };
  std::optional<Progress> take_progress();
  /// Buffered log lines; `dropped` receives how many were dropped since the last call.
  std::vector<LogRecord> take_logs(std::uint64_t* dropped = nullptr);

 private:
  friend struct detail::ContextAccess;

  Info info_;
  TraceParent trace_;  // parsed info_.traceparent; empty when malformed
  std::atomic<bool> cancelled_{false};
  mutable std::mutex mu_;
  mutable std::condition_variable cancel_cv_;
  std::optional<Progress> progress_;
  std::vector<LogRecord> logs_;
  std::uint64_t dropped_logs_ = 0;
  // Set by the worker: wakes its stream thread when something should go out early.
  std::function<void()> wake_;
};

}  // namespace dagmesh
