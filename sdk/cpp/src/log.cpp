#include "log.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <mutex>

namespace dagmesh::detail {

namespace {

int threshold() {
  static const int value = [] {
    const char* env = std::getenv("DAGMESH_LOG");
    if (env == nullptr || *env == '\0') return 1;
    if (std::strcmp(env, "debug") == 0) return 0;
    if (std::strcmp(env, "info") == 0) return 1;
    if (std::strcmp(env, "warn") == 0) return 2;
    if (std::strcmp(env, "error") == 0) return 3;
    if (std::strcmp(env, "off") == 0) return 4;
    return 1;
  }();
  return value;
}

std::mutex& stderr_mutex() {
  static std::mutex mu;
  return mu;
}

}  // namespace

bool log_enabled(LogLevel level) { return static_cast<int>(level) >= threshold(); }

void log_line(LogLevel level, const std::string& text) {
  const auto now = std::chrono::system_clock::now();
  const std::time_t secs = std::chrono::system_clock::to_time_t(now);
  const auto millis =
      std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()).count() % 1000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &tm);
  std::lock_guard<std::mutex> lock(stderr_mutex());
  std::fprintf(stderr, "%s.%03dZ %-5s dagmesh: %s\n", stamp, static_cast<int>(millis),
               to_string(level), text.c_str());
  std::fflush(stderr);
}

}  // namespace dagmesh::detail
