// dagmesh/otel.hpp against opentelemetry-cpp's API: the context it builds carries the
// executor's attempt span as a remote parent; a missing or malformed traceparent leaves the base
// context alone. Built only when the SDK found opentelemetry-cpp (the dagmesh::otel target).

#include <cstdio>
#include <string>

#include <opentelemetry/context/context.h>
#include <opentelemetry/trace/context.h>
#include <opentelemetry/trace/provider.h>
#include <opentelemetry/trace/span_context.h>
#include <opentelemetry/trace/span_startoptions.h>

#include "dagmesh/dagmesh.hpp"
#include "dagmesh/otel.hpp"

#ifndef DAGMESH_WITH_OPENTELEMETRY
#error "dagmesh::otel should define DAGMESH_WITH_OPENTELEMETRY"
#endif

namespace {

int failures = 0;

#define CHECK(cond)                                                                        \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond);        \
      ++failures;                                                                          \
    }                                                                                      \
  } while (0)

namespace trace_api = opentelemetry::trace;

dagmesh::TaskContext::Info info_with(const std::string& traceparent) {
  dagmesh::TaskContext::Info info;
  info.task_id = "run/step";
  info.task_type = "mesh.smooth";
  info.traceparent = traceparent;
  return info;
}

std::string hex(const trace_api::TraceId& id) {
  char buf[2 * trace_api::TraceId::kSize];
  id.ToLowerBase16(buf);
  return std::string(buf, sizeof buf);
}

std::string hex(const trace_api::SpanId& id) {
  char buf[2 * trace_api::SpanId::kSize];
  id.ToLowerBase16(buf);
  return std::string(buf, sizeof buf);
}

}  // namespace

int main() {
  const std::string trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
  const std::string span_id = "00f067aa0ba902b7";

  // Sampled: the attempt span, remote, with the ids of the traceparent.
  {
    dagmesh::TaskContext ctx(info_with("00-" + trace_id + "-" + span_id + "-01"));
    const auto context = dagmesh::otel::context_of(ctx);
    const auto parent = trace_api::GetSpan(context)->GetContext();
    CHECK(parent.IsValid());
    CHECK(parent.IsRemote());
    CHECK(parent.IsSampled());
    CHECK(hex(parent.trace_id()) == trace_id);
    CHECK(hex(parent.span_id()) == span_id);

    // What a handler does with it: a child span of the attempt (a no-op span here, as no SDK
    // tracer provider is installed; this checks that the documented calls compile and run).
    trace_api::StartSpanOptions options;
    options.parent = context;
    options.kind = trace_api::SpanKind::kConsumer;
    auto tracer = trace_api::Provider::GetTracerProvider()->GetTracer("dagmesh-otel-test");
    auto span = tracer->StartSpan("child", options);
    span->End();
  }

  // Not sampled.
  {
    dagmesh::TaskContext ctx(info_with("00-" + trace_id + "-" + span_id + "-00"));
    const auto parent = trace_api::GetSpan(dagmesh::otel::context_of(ctx))->GetContext();
    CHECK(parent.IsValid());
    CHECK(!parent.IsSampled());
  }

  // Missing, malformed (uppercase, all-zero id): the base context, unchanged.
  for (const std::string bad :
       {std::string(), "00-4BF92F3577B34DA6A3CE929D0E0E4736-" + span_id + "-01",
        "00-" + trace_id + "-0000000000000000-01", std::string("garbage")}) {
    dagmesh::TaskContext ctx(info_with(bad));
    opentelemetry::context::Context base;
    const auto context = dagmesh::otel::context_of(ctx, base);
    CHECK(!trace_api::GetSpan(context)->GetContext().IsValid());
    CHECK(!trace_api::GetSpan(dagmesh::otel::context_of(ctx))->GetContext().IsValid());
  }

  if (failures > 0) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::fprintf(stderr, "all checks passed\n");
  return 0;
}
