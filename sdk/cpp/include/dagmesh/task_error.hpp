#pragma once

#include <stdexcept>
#include <string>

namespace dagmesh {

/// Throw from a task handler to fail the attempt with `message`.
///
/// The executor retries the step (within its retry policy) only when `retryable` is true: pass
/// false for failures that every attempt would repeat, such as invalid input. Any other
/// exception escaping a handler fails the attempt with `retryable = true` and `what()` as the
/// message.
class TaskError : public std::runtime_error {
 public:
  explicit TaskError(const std::string& message, bool retryable = true)
      : std::runtime_error(message), retryable_(retryable) {}

  /// Whether another attempt could succeed.
  bool retryable() const noexcept { return retryable_; }

 private:
  bool retryable_;
};

}  // namespace dagmesh
