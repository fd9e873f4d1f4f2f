//! Webhook notifications (`WorkflowSpec.notifications`, `SubmitRunRequest.notifications`):
//! checked once, when the workflow is applied or the run submitted, so that the engine only
//! matches events against them.

use std::sync::Arc;

use dagmesh_proto::limits::MAX_EXPRESSION_LEN;
use dagmesh_proto::v1::Notification;
use serde_json::Value as Json;

use crate::error::SpecError;

/// The events a notification may ask for.
pub const EVENTS: &[&str] = &[
    "run.succeeded",
    "run.failed",
    "run.cancelled",
    "step.failed",
    "step.waiting_for_approval",
];

/// Notifications of one workflow, and of one run on top of them.
pub const MAX_NOTIFICATIONS: usize = 16;

/// Longest webhook URL.
pub const MAX_URL_LEN: usize = 2048;

/// A checked notification.
#[derive(Debug, Clone)]
pub struct CompiledNotification {
    pub url: String,
    pub events: Vec<String>,
    /// The filter's text and program; None: every event of `events`.
    pub filter: Option<(String, Arc<cel::Program>)>,
}

impl CompiledNotification {
    /// Whether `event` ("run.failed"...) with this `body` is to be delivered. `Err`: the filter
    /// failed or did not give a bool (the delivery is skipped; the caller logs why).
    pub fn wants(&self, event: &str, body: &Json) -> Result<bool, String> {
        if !self.events.iter().any(|wanted| wanted == event) {
            return Ok(false);
        }
        let Some((text, program)) = &self.filter else {
            return Ok(true);
        };
        match crate::expr::evaluate_json(program, &[("event", body)]) {
            Ok(Json::Bool(wanted)) => Ok(wanted),
            Ok(other) => Err(format!("filter {text:?} gave {other}, not a bool")),
            Err(error) => Err(format!("filter {text:?} failed: {error}")),
        }
    }
}

/// Checks the notifications given at submit (SubmitRunRequest.notifications), on a thread with
/// room for the expression parser (see [`crate::compile`]).
pub fn compile_run_notifications(
    notifications: &[Notification],
) -> Result<Vec<CompiledNotification>, crate::SpecErrors> {
    let mut errors = Vec::new();
    let compiled = crate::compile::on_compile_stack(|| {
        let compiled = compile_notifications("notifications", notifications, &mut errors);
        (compiled, errors)
    });
    match compiled {
        Ok((compiled, errors)) if errors.is_empty() => Ok(compiled),
        Ok((_, errors)) => Err(crate::SpecErrors(errors)),
        Err(error) => Err(crate::SpecErrors::single("notifications", error)),
    }
}

/// Checks `notifications` (at `path`, e.g. "notifications"), reporting every problem.
pub(crate) fn compile_notifications(
    path: &str,
    notifications: &[Notification],
    errors: &mut Vec<SpecError>,
) -> Vec<CompiledNotification> {
    if notifications.len() > MAX_NOTIFICATIONS {
        errors.push(SpecError::new(
            path,
            format!(
                "{} notifications, over the limit of {MAX_NOTIFICATIONS}",
                notifications.len()
            ),
        ));
        return Vec::new();
    }
    let mut compiled = Vec::new();
    for (i, notification) in notifications.iter().enumerate() {
        let at = format!("{path}[{i}]");
        let before = errors.len();
        check_url(&format!("{at}.url"), &notification.url, errors);
        if notification.events.len() > EVENTS.len() {
            errors.push(SpecError::new(
                format!("{at}.events"),
                format!(
                    "{} events, over the limit of {} (each of {} at most once)",
                    notification.events.len(),
                    EVENTS.len(),
                    EVENTS.join(", ")
                ),
            ));
            continue;
        }
        if notification.events.is_empty() {
            errors.push(SpecError::new(
                format!("{at}.events"),
                format!(
                    "at least one event is required (one of {})",
                    EVENTS.join(", ")
                ),
            ));
        }
        for (k, event) in notification.events.iter().enumerate() {
            if !EVENTS.contains(&event.as_str()) {
                let shown: String = event.chars().take(64).collect();
                errors.push(SpecError::new(
                    format!("{at}.events[{k}]"),
                    format!(
                        "unknown event {shown:?}; expected one of {}",
                        EVENTS.join(", ")
                    ),
                ));
            } else if notification.events[..k].contains(event) {
                errors.push(SpecError::new(
                    format!("{at}.events[{k}]"),
                    format!("{event} is listed twice"),
                ));
            }
        }
        let filter = match notification.filter.trim() {
            "" => None,
            text if text.len() > MAX_EXPRESSION_LEN => {
                errors.push(SpecError::new(
                    format!("{at}.filter"),
                    format!(
                        "{} bytes, over the limit of {MAX_EXPRESSION_LEN}",
                        text.len()
                    ),
                ));
                None
            }
            text => match crate::expr::compile(text) {
                Ok(program) => Some((text.to_owned(), Arc::new(program))),
                Err(error) => {
                    errors.push(SpecError::new(format!("{at}.filter"), error));
                    None
                }
            },
        };
        if errors.len() == before {
            compiled.push(CompiledNotification {
                url: notification.url.clone(),
                events: notification.events.clone(),
                filter,
            });
        }
    }
    compiled
}

fn check_url(path: &str, url: &str, errors: &mut Vec<SpecError>) {
    if url.is_empty() {
        errors.push(SpecError::new(
            path,
            "required (an http:// or https:// URL)",
        ));
        return;
    }
    if url.len() > MAX_URL_LEN {
        errors.push(SpecError::new(
            path,
            format!("{} bytes, over the limit of {MAX_URL_LEN}", url.len()),
        ));
        return;
    }
    let problem = match url.parse::<http::Uri>() {
        Err(error) => Some(format!("not a URL: {error}")),
        Ok(uri) => match (uri.scheme_str(), uri.host()) {
            (Some("http" | "https"), Some(host)) if !host.is_empty() => None,
            (Some("http" | "https"), _) => Some("has no host".to_owned()),
            _ => Some("must start with http:// or https://".to_owned()),
        },
    };
    if let Some(problem) = problem {
        let shown: String = url.chars().take(128).collect();
        errors.push(SpecError::new(path, format!("{shown:?} {problem}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notification(url: &str, events: &[&str], filter: &str) -> Notification {
        Notification {
            url: url.into(),
            events: events.iter().map(|e| e.to_string()).collect(),
            filter: filter.into(),
        }
    }

    #[test]
    fn bad_notifications_are_named_field_by_field() {
        let mut errors = Vec::new();
        let compiled = compile_notifications(
            "notifications",
            &[
                notification("https://hooks.example.com/x", &["run.failed"], ""),
                notification("ftp://x", &["run.failed"], ""),
                notification("http://", &["run.failed"], ""),
                notification("https://a", &[], ""),
                notification(
                    "https://a",
                    &["run.exploded", "run.failed", "run.failed"],
                    "",
                ),
                notification("https://a", &["run.failed"], "event.run.state =="),
                notification("https://a", &["run.failed"; 6], ""),
            ],
            &mut errors,
        );
        assert_eq!(compiled.len(), 1);
        let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "notifications[1].url",
                "notifications[2].url",
                "notifications[3].events",
                "notifications[4].events[0]",
                "notifications[4].events[2]",
                "notifications[5].filter",
                "notifications[6].events",
            ],
            "{errors:?}"
        );
    }

    #[test]
    fn filters_select_events() {
        let mut errors = Vec::new();
        let compiled = compile_notifications(
            "notifications",
            &[notification(
                "https://a",
                &["run.failed", "step.failed"],
                "event.run.tags.team == 'vision'",
            )],
            &mut errors,
        );
        assert!(errors.is_empty(), "{errors:?}");
        let hook = &compiled[0];
        let body = |team: &str| serde_json::json!({"run": {"tags": {"team": team}}});
        assert_eq!(hook.wants("run.failed", &body("vision")), Ok(true));
        assert_eq!(hook.wants("run.failed", &body("audio")), Ok(false));
        assert_eq!(hook.wants("run.succeeded", &body("vision")), Ok(false));
        // A filter that fails (no tags) skips the delivery with the reason.
        assert!(
            hook.wants("run.failed", &serde_json::json!({"run": {}}))
                .is_err()
        );
    }
}
