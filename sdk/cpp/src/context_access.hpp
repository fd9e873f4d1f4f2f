#pragma once

#include <cstddef>
#include <functional>
#include <mutex>

#include "dagmesh/task_context.hpp"

namespace dagmesh::detail {

/// Lines held per task between flushes; beyond it lines are counted and dropped, so a handler
/// that logs in a tight loop cannot exhaust memory while the stream is down.
constexpr std::size_t kLogBufferLines = 1000;
/// A batch this large is flushed at once instead of waiting for the next tick.
constexpr std::size_t kLogEarlyFlushLines = 200;

struct ContextAccess {
  static void set_wake(TaskContext& ctx, std::function<void()> wake) {
    std::lock_guard<std::mutex> lock(ctx.mu_);
    ctx.wake_ = std::move(wake);
  }
  /// Whether progress or logs wait to be sent.
  /// `log_lines` counts a pending "lines dropped" notice as one line.
  static bool has_pending(TaskContext& ctx, bool* has_progress, std::size_t* log_lines) {
    std::lock_guard<std::mutex> lock(ctx.mu_);
    *has_progress = ctx.progress_.has_value();
    *log_lines = ctx.logs_.size() + (ctx.dropped_logs_ > 0 ? 1 : 0);
    return *has_progress || *log_lines > 0;
  }
};

}  // namespace dagmesh::detail
