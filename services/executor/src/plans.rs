//! Compiled workflow versions, cached: versions are immutable, so a compiled plan never goes stale.

use std::collections::HashMap;
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
    fn from_compiled(workflow: Workflow, compiled: CompiledWorkflow) -> Self {
        let index = compiled
            .steps
            .iter()
            .map(|step| (step.id.clone(), step.index))
            .collect();
        let routes = compiled
            .steps
            .iter()
            .map(|step| {
                Arc::new(Route {
                    task_name: step.task_name.clone(),
                    version_req: step.version_req.clone(),
                    labels: step.labels.clone(),
                    slots: step.slots,
                    concurrency_key: step.concurrency_key.clone(),
                })
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

pub struct PlanCache {
    store: Arc<dyn MetadataStore>,
    plans: Mutex<HashMap<(String, u32), Arc<Plan>>>,
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
        Ok((plans.entry(key).or_insert(plan).clone(), created))
    }

    /// The plan of `name` at `version` (None: the latest).
    pub async fn get(&self, name: &str, version: Option<u32>) -> Result<Arc<Plan>, ExecError> {
        if let Some(version) = version {
            let cached = self
                .plans
                .lock()
                .expect("plan cache poisoned")
                .get(&(name.to_owned(), version))
                .cloned();
            if let Some(plan) = cached {
                return Ok(plan);
            }
        }
        let workflow = self.store.get_workflow(name, version).await?;
        let key = (workflow.name.clone(), workflow.version);
        if let Some(plan) = self.plans.lock().expect("plan cache poisoned").get(&key) {
            return Ok(plan.clone());
        }
        let plan = Arc::new(Plan::new(workflow)?);
        let mut plans = self.plans.lock().expect("plan cache poisoned");
        Ok(plans.entry(key).or_insert(plan).clone())
    }
}
