#include "dagmesh/task_context.hpp"

#include <algorithm>
#include <cmath>

#include "context_access.hpp"
#include "log.hpp"

namespace dagmesh {

const char* to_string(LogLevel level) noexcept {
  switch (level) {
    case LogLevel::Debug:
      return "debug";
    case LogLevel::Info:
      return "info";
    case LogLevel::Warn:
      return "warn";
    case LogLevel::Error:
      return "error";
  }
  return "info";
}

namespace {

bool is_lower_hex(std::string_view text) {
  return std::all_of(text.begin(), text.end(),
                     [](char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'); });
}

bool all_zero(std::string_view text) {
  return std::all_of(text.begin(), text.end(), [](char c) { return c == '0'; });
}

int hex_value(char c) { return c <= '9' ? c - '0' : c - 'a' + 10; }

}  // namespace

std::optional<TraceParent> parse_traceparent(std::string_view header) {
  // 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01
  // 0  3                                36               53
  constexpr std::size_t kSize = 55;
  if (header.size() != kSize) return std::nullopt;
  if (header[2] != '-' || header[35] != '-' || header[52] != '-') return std::nullopt;
  const std::string_view version = header.substr(0, 2);
  const std::string_view trace_id = header.substr(3, 32);
  const std::string_view span_id = header.substr(36, 16);
  const std::string_view flags = header.substr(53, 2);
  if (version != "00") return std::nullopt;
  if (!is_lower_hex(trace_id) || !is_lower_hex(span_id) || !is_lower_hex(flags)) {
    return std::nullopt;
  }
  if (all_zero(trace_id) || all_zero(span_id)) return std::nullopt;
  TraceParent parsed;
  parsed.trace_id = std::string(trace_id);
  parsed.parent_span_id = std::string(span_id);
  parsed.flags = static_cast<std::uint8_t>(hex_value(flags[0]) * 16 + hex_value(flags[1]));
  return parsed;
}

TaskContext::TaskContext(Info info) : info_(std::move(info)) {
  if (auto parsed = parse_traceparent(info_.traceparent)) trace_ = std::move(*parsed);
}

std::unique_ptr<TaskContext> TaskContext::detached(std::string task_id, std::uint32_t attempt) {
  Info info;
  info.task_id = std::move(task_id);
  info.attempt = attempt;
  return std::make_unique<TaskContext>(std::move(info));
}

bool TaskContext::wait_cancelled(std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  return cancel_cv_.wait_for(lock, timeout, [this] { return cancelled(); });
}

void TaskContext::cancel() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    cancelled_.store(true, std::memory_order_release);
  }
  cancel_cv_.notify_all();
}

void TaskContext::progress(double fraction, std::string message) {
  progress(fraction, std::move(message), {});
}

void TaskContext::progress(double fraction, std::string message,
                           std::map<std::string, double> metrics) {
  if (std::isnan(fraction)) fraction = 0;
  fraction = std::clamp(fraction, 0.0, 1.0);
  std::function<void()> wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    progress_ = Progress{static_cast<float>(fraction), std::move(message), std::move(metrics)};
    wake = wake_;
  }
  if (wake) wake();
}

void TaskContext::log(LogLevel level, std::string text) {
  if (detail::log_enabled(level)) {
    std::string prefix = "[" + info_.task_id + "#" + std::to_string(info_.attempt);
    if (!trace_.trace_id.empty()) prefix += " trace_id=" + trace_.trace_id;
    detail::log_line(level, prefix + "] " + text);
  }
  std::function<void()> wake;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (logs_.size() >= detail::kLogBufferLines) {
      ++dropped_logs_;
      return;
    }
    logs_.push_back(LogRecord{std::chrono::system_clock::now(), level, std::move(text)});
    if (logs_.size() >= detail::kLogEarlyFlushLines) wake = wake_;
  }
  if (wake) wake();
}

std::optional<TaskContext::Progress> TaskContext::take_progress() {
  std::lock_guard<std::mutex> lock(mu_);
  std::optional<Progress> taken;
  taken.swap(progress_);
  return taken;
}

std::vector<TaskContext::LogRecord> TaskContext::take_logs(std::uint64_t* dropped) {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<LogRecord> taken;
  taken.swap(logs_);
  if (dropped != nullptr) *dropped = dropped_logs_;
  dropped_logs_ = 0;
  return taken;
}

}  // namespace dagmesh
