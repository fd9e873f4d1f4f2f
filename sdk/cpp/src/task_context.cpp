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

TaskContext::TaskContext(Info info) : info_(std::move(info)) {}

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
    detail::log_line(level, "[" + info_.task_id + "#" + std::to_string(info_.attempt) + "] " + text);
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
