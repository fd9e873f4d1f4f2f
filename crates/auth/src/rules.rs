//! The scope each RPC needs. One table for every service, so the rules can be read (and
//! reviewed) in one place; a path that is not in it needs the internal scope, so an RPC added
//! without a rule is closed, not open (and a test fails until it gets one).

use dagmesh_proto::v1::Scope;

/// What a call to one path needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// No credentials (health checks, for load balancers and kubelets).
    Public,
    /// Any valid credentials.
    Authenticated,
    /// Valid credentials with this scope (see `Principal::allows`).
    Scope(Scope),
}

/// (service, method or "*" for every method, access).
const RULES: &[(&str, &str, Access)] = &[
    ("grpc.health.v1.Health", "*", Access::Public),
    // Reflection lists the API; reading it is reading.
    (
        "grpc.reflection.v1.ServerReflection",
        "*",
        Access::Scope(Scope::Read),
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "*",
        Access::Scope(Scope::Read),
    ),
    // KEDA cannot present a token. The scaler answers only counts of queued and running
    // tasks for the task type it is asked about, like the unauthenticated /metrics port.
    ("externalscaler.ExternalScaler", "*", Access::Public),
    (
        "dagmesh.v1.RunService",
        "SubmitRun",
        Access::Scope(Scope::Submit),
    ),
    (
        "dagmesh.v1.RunService",
        "GetRun",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.RunService",
        "ListRuns",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.RunService",
        "WatchRun",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.RunService",
        "GetStepLogs",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.RunService",
        "CancelRun",
        Access::Scope(Scope::Operate),
    ),
    (
        "dagmesh.v1.RunService",
        "RetryRun",
        Access::Scope(Scope::Operate),
    ),
    (
        "dagmesh.v1.RunService",
        "ApproveStep",
        Access::Scope(Scope::Operate),
    ),
    (
        "dagmesh.v1.RunService",
        "SuspendRun",
        Access::Scope(Scope::Operate),
    ),
    (
        "dagmesh.v1.RunService",
        "ResumeRun",
        Access::Scope(Scope::Operate),
    ),
    // Like PublishEvent, whose deliveries it carries.
    (
        "dagmesh.v1.RunService",
        "DeliverEvent",
        Access::Scope(Scope::Submit),
    ),
    (
        "dagmesh.v1.WorkflowService",
        "ApplyWorkflow",
        Access::Scope(Scope::Admin),
    ),
    (
        "dagmesh.v1.WorkflowService",
        "GetWorkflow",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.WorkflowService",
        "ListWorkflows",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.WorkerService",
        "Connect",
        Access::Scope(Scope::Worker),
    ),
    (
        "dagmesh.v1.ClusterService",
        "ListWorkers",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.ClusterService",
        "ListQueues",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.WebhookService",
        "ListDeliveries",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.SchedulerService",
        "GetSchedule",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.SchedulerService",
        "ListSchedules",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.SchedulerService",
        "ListTriggers",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.SchedulerService",
        "GetBackfill",
        Access::Scope(Scope::Read),
    ),
    (
        "dagmesh.v1.SchedulerService",
        "ListBackfills",
        Access::Scope(Scope::Read),
    ),
    // Publishing an event starts the runs of its triggers: a backend's way of submitting.
    (
        "dagmesh.v1.SchedulerService",
        "PublishEvent",
        Access::Scope(Scope::Submit),
    ),
    // Every other scheduler method changes schedules, triggers or backfills.
    (
        "dagmesh.v1.SchedulerService",
        "*",
        Access::Scope(Scope::Admin),
    ),
    ("dagmesh.v1.TokenService", "WhoAmI", Access::Authenticated),
    ("dagmesh.v1.TokenService", "*", Access::Scope(Scope::Admin)),
    // The store API: only the services themselves.
    (
        "dagmesh.v1.MetadataService",
        "*",
        Access::Scope(Scope::Internal),
    ),
    // Executor replicas handing tasks to each other: only the services themselves.
    (
        "dagmesh.v1.PeerService",
        "*",
        Access::Scope(Scope::Internal),
    ),
];

/// What a call to `path` (`/package.Service/Method`) needs.
pub fn access(path: &str) -> Access {
    // The web console's static files (`/` and `/console/...`; no gRPC service is named so):
    // the same for everyone, and the app asks for a token before it calls anything.
    if path == "/" || path.starts_with("/console/") {
        return Access::Public;
    }
    let Some((service, method)) = path.trim_start_matches('/').split_once('/') else {
        return Access::Scope(Scope::Internal);
    };
    let exact = RULES.iter().find(|(s, m, _)| *s == service && *m == method);
    let any = || RULES.iter().find(|(s, m, _)| *s == service && *m == "*");
    match exact.or_else(any) {
        Some((_, _, access)) => *access,
        None => Access::Scope(Scope::Internal),
    }
}

/// Whether the table names this service explicitly (for the completeness test).
pub fn covers_service(service: &str) -> bool {
    RULES.iter().any(|(s, _, _)| *s == service)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn every_dagmesh_rpc_has_a_rule() {
        let set =
            prost_types::FileDescriptorSet::decode(dagmesh_proto::FILE_DESCRIPTOR_SET).unwrap();
        let mut checked = 0;
        for file in &set.file {
            if file.package() != "dagmesh.v1" {
                continue;
            }
            for service in &file.service {
                let name = format!("dagmesh.v1.{}", service.name());
                assert!(covers_service(&name), "{name} has no rule");
                for method in &service.method {
                    let path = format!("/{name}/{}", method.name());
                    let access = access(&path);
                    let internal_only = ["dagmesh.v1.MetadataService", "dagmesh.v1.PeerService"];
                    if !internal_only.contains(&name.as_str()) {
                        assert_ne!(
                            access,
                            Access::Scope(Scope::Internal),
                            "{path} fell through to internal-only: give it a rule"
                        );
                    }
                    assert_ne!(access, Access::Public, "{path} must not be public");
                    checked += 1;
                }
            }
        }
        assert!(checked > 40, "only {checked} RPCs found");
    }

    #[test]
    fn examples() {
        assert_eq!(access("/grpc.health.v1.Health/Check"), Access::Public);
        assert_eq!(access("/"), Access::Public);
        assert_eq!(access("/console/app.js"), Access::Public);
        assert_ne!(access("/consoleX/app.js"), Access::Public);
        assert_ne!(access("//dagmesh.v1.RunService/SubmitRun"), Access::Public);
        assert_eq!(
            access("/dagmesh.v1.RunService/CancelRun"),
            Access::Scope(Scope::Operate)
        );
        assert_eq!(
            access("/dagmesh.v1.SchedulerService/CreateSchedule"),
            Access::Scope(Scope::Admin)
        );
        assert_eq!(
            access("/dagmesh.v1.MetadataService/Commit"),
            Access::Scope(Scope::Internal)
        );
        assert_eq!(access("/nope.Service/X"), Access::Scope(Scope::Internal));
        assert_eq!(access("garbage"), Access::Scope(Scope::Internal));
    }
}
