//! Compiled workflow versions, cached: versions are immutable, so a compiled plan never goes stale.
//! The cache is bounded by the steps it holds (least recently used first out); a plan that is
//! evicted lives on in the runs that use it and is compiled again when it is needed again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use dagmesh_metastore::MetadataStore;
use dagmesh_proto::v1::{Workflow, WorkflowSpec};
use dagmesh_spec::CompiledWorkflow;

use crate::ExecError;
use crate::engine::Route;

/// One workflow version, ready to run.
pub struct Plan {
    pub workflow: Workflow,
    pub compiled: CompiledWorkflow,
    /// Step id -> index in `compiled.steps`.
    pub index: HashMap<String, usize>,
    /// Per step: the worker it needs, shared by all runs so equal routes share a ready queue.
    pub(crate) routes: Vec<Arc<Route>>,
}

impl Plan {
    pub(crate) fn from_compiled(workflow: Workflow, compiled: CompiledWorkflow) -> Self {
        let index = compiled
            .steps
            .iter()
            .map(|step| (step.id.clone(), step.index))
            .collect();
        // Equal routes share one `Arc`: one copy for a fan-out's thousands of alike steps, and
        // the ready queues compare them by pointer.
        let mut interned: HashSet<Arc<Route>> = HashSet::new();
        let routes = compiled
            .steps
            .iter()
            .map(|step| {
                let route = Route {
                    task_name: step.task_name.clone(),
                    version_req: step.version_req.clone(),
                    labels: step.labels.clone(),
                    slots: step.slots,
                    concurrency_key: step.concurrency_key.clone(),
                };
                if let Some(shared) = interned.get(&route) {
                    return shared.clone();
                }
                let shared = Arc::new(route);
                interned.insert(shared.clone());
                shared
            })
            .collect();
        Self {
            workflow,
            compiled,
            index,
            routes,
        }
    }

    fn new(workflow: Workflow) -> Result<Self, ExecError> {
        let spec = workflow.spec.clone().unwrap_or_default();
        let compiled = dagmesh_spec::compile(&spec).map_err(|errors| {
            // A stored version was valid when applied; failing now means the validator changed.
            ExecError::FailedPrecondition(format!(
                "workflow {} version {} no longer compiles:\n{errors}",
                workflow.name, workflow.version
            ))
        })?;
        Ok(Self::from_compiled(workflow, compiled))
    }
}

/// Steps of all cached plans together: a client applying new 10,000-step versions in a loop
/// must not grow the executor's memory without bound.
const MAX_CACHED_STEPS: usize = 50_000;

pub struct PlanCache {
    store: Arc<dyn MetadataStore>,
    plans: Mutex<Cached>,
}

#[derive(Default)]
struct Cached {
    /// (name, version) -> (plan, last use).
    plans: HashMap<(String, u32), (Arc<Plan>, u64)>,
    steps: usize,
    clock: u64,
}

impl Cached {
    fn get(&mut self, key: &(String, u32)) -> Option<Arc<Plan>> {
        self.clock += 1;
        let (plan, used) = self.plans.get_mut(key)?;
        *used = self.clock;
        Some(plan.clone())
    }

    /// The cached plan of `key` if there is one (another caller compiled it first), else `plan`,
    /// now cached; the least recently used plans go until the steps fit again.
    fn insert(&mut self, key: (String, u32), plan: Arc<Plan>) -> Arc<Plan> {
        if let Some(cached) = self.get(&key) {
            return cached;
        }
        self.steps += plan.compiled.steps.len();
        self.plans.insert(key.clone(), (plan.clone(), self.clock));
        while self.steps > MAX_CACHED_STEPS && self.plans.len() > 1 {
            let Some(oldest) = self
                .plans
                .iter()
                .filter(|(k, _)| **k != key)
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((evicted, _)) = self.plans.remove(&oldest) {
                self.steps -= evicted.compiled.steps.len();
            }
        }
        plan
    }
}

impl PlanCache {
    pub fn new(store: Arc<dyn MetadataStore>) -> Self {
        Self {
            store,
            plans: Mutex::default(),
        }
    }

    /// Validates and stores a spec (a no-op for unchanged content), returning its plan.
    pub async fn apply(&self, spec: WorkflowSpec) -> Result<(Arc<Plan>, bool), ExecError> {
        let compiled = dagmesh_spec::compile(&spec)
            .map_err(|errors| ExecError::InvalidArgument(errors.to_string()))?;
        let hash = dagmesh_spec::content_hash(&spec);
        let (workflow, created) = self.store.put_workflow(spec, hash).await?;
        let key = (workflow.name.clone(), workflow.version);
        let plan = Arc::new(Plan::from_compiled(workflow, compiled));
        let mut plans = self.plans.lock().expect("plan cache poisoned");
        Ok((plans.insert(key, plan), created))
    }

    /// The plan of `name` at `version` (None: the latest).
    pub async fn get(&self, name: &str, version: Option<u32>) -> Result<Arc<Plan>, ExecError> {
        if let Some(version) = version {
            let cached = self
                .plans
                .lock()
                .expect("plan cache poisoned")
                .get(&(name.to_owned(), version));
            if let Some(plan) = cached {
                return Ok(plan);
            }
        }
        let workflow = self.store.get_workflow(name, version).await?;
        let key = (workflow.name.clone(), workflow.version);
        if let Some(plan) = self.plans.lock().expect("plan cache poisoned").get(&key) {
            return Ok(plan);
        }
        let plan = Arc::new(Plan::new(workflow)?);
        let mut plans = self.plans.lock().expect("plan cache poisoned");
        Ok(plans.insert(key, plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dagmesh_proto::v1::StepSpec;

    fn plan(name: &str, steps: usize) -> Arc<Plan> {
        let spec = WorkflowSpec {
            name: name.into(),
            steps: (0..steps)
                .map(|i| StepSpec {
                    id: format!("s{i}"),
                    task: "echo".into(),
                    ..StepSpec::default()
                })
                .collect(),
            ..WorkflowSpec::default()
        };
        let compiled = dagmesh_spec::compile(&spec).expect("valid");
        let workflow = Workflow {
            name: name.into(),
            version: 1,
            spec: Some(spec),
            ..Workflow::default()
        };
        Arc::new(Plan::from_compiled(workflow, compiled))
    }

    #[test]
    fn equal_routes_of_a_plan_share_one_arc() {
        let spec = WorkflowSpec {
            name: "w".into(),
            steps: ["a", "b", "c"]
                .iter()
                .map(|id| StepSpec {
                    id: (*id).into(),
                    task: if *id == "c" { "other" } else { "echo" }.into(),
                    ..StepSpec::default()
                })
                .collect(),
            ..WorkflowSpec::default()
        };
        let compiled = dagmesh_spec::compile(&spec).expect("valid");
        let plan = Plan::from_compiled(Workflow::default(), compiled);
        let route = |id: &str| &plan.routes[plan.index[id]];
        assert!(Arc::ptr_eq(route("a"), route("b")));
        assert!(!Arc::ptr_eq(route("a"), route("c")));
        assert_eq!(route("c").task_name, "other");
    }

    #[test]
    fn the_cache_keeps_its_steps_bounded_and_the_recently_used_plans() {
        let mut cache = Cached::default();
        // The largest workflows allowed: two of them (and a bit) fill the cache.
        let big = dagmesh_proto::limits::MAX_STEPS;
        cache.insert(("keep".into(), 1), plan("keep", big));
        for i in 0..10 {
            cache.insert((format!("w{i}"), 1), plan(&format!("w{i}"), big));
            // Used all along, so never the least recently used.
            assert!(cache.get(&("keep".into(), 1)).is_some(), "round {i}");
            assert!(
                cache.steps <= MAX_CACHED_STEPS,
                "{} steps cached",
                cache.steps
            );
        }
        assert!(cache.get(&("w9".into(), 1)).is_some(), "the newest stays");
        assert!(cache.get(&("w0".into(), 1)).is_none(), "the oldest went");
        let counted: usize = cache
            .plans
            .values()
            .map(|(p, _)| p.compiled.steps.len())
            .sum();
        assert_eq!(counted, cache.steps);
    }
}
