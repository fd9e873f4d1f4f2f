#pragma once

// The SDK's own diagnostics, to stderr. DAGMESH_LOG=debug|info|warn|error|off picks the lowest
// level printed (default info).

#include <sstream>
#include <string>

#include "dagmesh/task_context.hpp"

namespace dagmesh::detail {

bool log_enabled(LogLevel level);
void log_line(LogLevel level, const std::string& text);

}  // namespace dagmesh::detail

#define DAGMESH_LOG(level, expr)                                  \
  do {                                                            \
    if (::dagmesh::detail::log_enabled(level)) {                  \
      std::ostringstream dagmesh_log_os_;                         \
      dagmesh_log_os_ << expr;                                    \
      ::dagmesh::detail::log_line(level, dagmesh_log_os_.str());  \
    }                                                             \
  } while (0)
#define DAGMESH_DEBUG(expr) DAGMESH_LOG(::dagmesh::LogLevel::Debug, expr)
#define DAGMESH_INFO(expr) DAGMESH_LOG(::dagmesh::LogLevel::Info, expr)
#define DAGMESH_WARN(expr) DAGMESH_LOG(::dagmesh::LogLevel::Warn, expr)
#define DAGMESH_ERROR(expr) DAGMESH_LOG(::dagmesh::LogLevel::Error, expr)
