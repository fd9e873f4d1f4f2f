//! Continues the executor's trace in step code.
//!
//! Every Assign carries a W3C `traceparent` naming the attempt's span in the executor's trace.
//! The span a handler runs in takes it as its OpenTelemetry parent, so when the worker process
//! exports `tracing` spans through `tracing-opentelemetry`, the handler's spans (and everything
//! under them) appear under that attempt. Without such a layer this does nothing.

use opentelemetry::Context;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Makes the attempt's span (from `traceparent`) the OpenTelemetry parent of `span`.
pub(super) fn continue_trace(span: &tracing::Span, traceparent: &str) {
    if let Some(parent) = parse_traceparent(traceparent) {
        // Fails only when no OpenTelemetry layer is installed: then there is nothing to link.
        let _ = span.set_parent(Context::new().with_remote_span_context(parent));
    }
}

/// `VERSION-TRACEID-SPANID-FLAGS` per W3C Trace Context; None for anything malformed or for
/// all-zero ids. Versions above 00 may append fields, which are ignored.
fn parse_traceparent(traceparent: &str) -> Option<SpanContext> {
    let mut fields = traceparent.trim().split('-');
    let (version, trace_id, span_id, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let hex = |field: &str, len: usize| {
        field.len() == len
            && field
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    if !(hex(version, 2) && hex(trace_id, 32) && hex(span_id, 16) && hex(flags, 2))
        || version == "ff"
        || (version == "00" && fields.next().is_some())
    {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(flags) & TraceFlags::SAMPLED,
        true,
        Default::default(),
    );
    context.is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_w3c_format_and_refuses_the_rest() {
        let parsed = parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .expect("valid traceparent");
        assert_eq!(
            parsed.trace_id(),
            TraceId::from_hex("0af7651916cd43dd8448eb211c80319c").unwrap()
        );
        assert_eq!(
            parsed.span_id(),
            SpanId::from_hex("b7ad6b7169203331").unwrap()
        );
        assert!(parsed.is_sampled());
        assert!(parsed.is_remote());
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
        ] {
            assert!(parse_traceparent(bad).is_none(), "accepted {bad:?}");
        }
        assert!(
            parse_traceparent("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-later")
                .is_some_and(|c| !c.is_sampled())
        );
    }
}
