#pragma once

// Optional OpenTelemetry integration (opentelemetry-cpp), header-only: continue the executor's
// trace in step code.
//
//   #include <dagmesh/otel.hpp>
//
//   auto tracer = opentelemetry::trace::Provider::GetTracerProvider()->GetTracer("my-worker");
//   opentelemetry::trace::StartSpanOptions options;
//   options.parent = dagmesh::otel::context_of(ctx);   // the executor's attempt span
//   options.kind = opentelemetry::trace::SpanKind::kConsumer;
//   auto span = tracer->StartSpan("mesh.smooth", options);
//   auto scope = tracer->WithActiveSpan(span);          // spans started below nest under it
//   ...
//   span->End();
//
// Not included by <dagmesh/dagmesh.hpp>, and dagmesh::sdk itself never links opentelemetry-cpp.
// To use it, either link the CMake target dagmesh::otel (present when the SDK was configured
// with DAGMESH_WITH_OPENTELEMETRY and found opentelemetry-cpp; it brings
// opentelemetry-cpp::api and defines DAGMESH_WITH_OPENTELEMETRY=1), or link
// opentelemetry-cpp::api yourself next to dagmesh::sdk (and define DAGMESH_WITH_OPENTELEMETRY=1
// if your code wants to test for it). Built with opentelemetry-cpp's API headers only; which
// SDK/exporter records the spans is the application's choice.

#if defined(__has_include)
#if !__has_include(<opentelemetry/trace/propagation/http_trace_context.h>)
#error "dagmesh/otel.hpp needs opentelemetry-cpp: link dagmesh::otel (SDK configured with DAGMESH_WITH_OPENTELEMETRY) or opentelemetry-cpp::api"
#endif
#endif

#include <string>

#include <opentelemetry/context/context.h>
#include <opentelemetry/context/propagation/text_map_propagator.h>
#include <opentelemetry/context/runtime_context.h>
#include <opentelemetry/nostd/string_view.h>
#include <opentelemetry/trace/propagation/http_trace_context.h>

#include "dagmesh/task_context.hpp"

namespace dagmesh::otel {

/// A read-only TextMapCarrier holding one `traceparent` (what W3C propagation reads).
class TraceparentCarrier final : public opentelemetry::context::propagation::TextMapCarrier {
 public:
  explicit TraceparentCarrier(const std::string& traceparent) : traceparent_(traceparent) {}

  opentelemetry::nostd::string_view Get(
      opentelemetry::nostd::string_view key) const noexcept override {
    if (key == "traceparent") {
      return opentelemetry::nostd::string_view(traceparent_.data(), traceparent_.size());
    }
    return {};
  }
  void Set(opentelemetry::nostd::string_view, opentelemetry::nostd::string_view) noexcept override {}

 private:
  const std::string& traceparent_;
};

/// `base` with the executor's attempt span (from `task.traceparent()`) as its span: a remote
/// parent, so StartSpanOptions::parent = context_of(ctx) makes spans that are children of the
/// attempt, in the run's trace. When the traceparent is missing or malformed (then
/// `task.trace_id()` is empty), `base` comes back unchanged.
inline opentelemetry::context::Context context_of(const TaskContext& task,
                                                  opentelemetry::context::Context base) {
  if (task.trace_id().empty()) return base;
  const TraceparentCarrier carrier(task.traceparent());
  opentelemetry::trace::propagation::HttpTraceContext propagator;
  return propagator.Extract(carrier, base);
}

/// context_of() on top of the calling thread's current context.
inline opentelemetry::context::Context context_of(const TaskContext& task) {
  return context_of(task, opentelemetry::context::RuntimeContext::GetCurrent());
}

}  // namespace dagmesh::otel
