//! Workflows in code: a typed builder that produces the same [`WorkflowSpec`] a YAML workflow
//! file does, for [`Client::apply_workflow`](crate::Client::apply_workflow) or
//! [`SubmitRun::inline`](crate::SubmitRun::inline).
//!
//! Steps are added one by one; [`Workflow::add`] returns a [`StepId`] that later steps name in
//! [`Step::needs`], so a dependency is on a step that exists, not on a string that may be
//! misspelt. Expressions (`inputs`, `when`, `for_each`, filters, cache keys) are CEL text, as in
//! YAML; the server checks them, with field paths, when the workflow is applied.
//!
//! ```
//! use dagmesh_sdk::workflow::{Input, Step, Workflow};
//!
//! let mut wf = Workflow::new("room-scan").description("Photos of a room to a mesh");
//! wf.input("room_id", Input::string());
//! wf.input("image_count", Input::int().default(8));
//! let fetch = wf.add(
//!     Step::task("fetch", "images.fetch@^1")
//!         .input("room", "inputs.room_id")
//!         .input("count", "inputs.image_count"),
//! );
//! let features = wf.add(
//!     Step::task("features", "features.extract@^1")
//!         .needs(&fetch)
//!         .for_each("fetch.images")
//!         .max_parallel(4)
//!         .input("image", "item"),
//! );
//! let mesh = wf.add(Step::workflow("mesh", "mesh-room@2").needs(&features));
//! wf.add(Step::approval("review", "Ship the mesh?").timeout("24h").needs(&mesh));
//! wf.on_exit(Step::task("notify", "notify@^1").input("state", "run.state"));
//! let spec = wf.build().expect("a well-formed workflow");
//! assert_eq!(spec.steps.len(), 4);
//! ```

use std::collections::HashSet;

use dagmesh_proto::v1::{
    ApprovalSpec, CacheSpec, InputSpec, RetryPolicy, StepSpec, WaitForSpec, WorkflowSpec,
};

/// What [`Workflow::build`] refuses: mistakes the builder can see on its own. Everything else
/// (expressions, limits, cycles) the server reports when the workflow is applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorkflowError {
    #[error("step {0:?}: the id is used twice (steps and hooks share ids)")]
    DuplicateId(String),
    #[error("step {step:?}: needs {need:?}, which is not a step of this workflow")]
    UnknownNeed { step: String, need: String },
    #[error("step {0:?}: an exit hook runs after the whole DAG and needs nothing")]
    HookWithNeeds(String),
    #[error("a step id is empty")]
    EmptyId,
}

/// A step added to a [`Workflow`]: what later steps name in [`Step::needs`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StepId(String);

impl StepId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&StepId> for StepId {
    fn from(id: &StepId) -> Self {
        id.clone()
    }
}

/// A step id given as text, for a step added elsewhere (checked by [`Workflow::build`]).
impl From<&str> for StepId {
    fn from(id: &str) -> Self {
        StepId(id.to_owned())
    }
}

/// A declared run input (`WorkflowSpec.inputs`).
#[derive(Debug, Clone)]
#[must_use]
pub struct Input(InputSpec);

impl Input {
    /// An input of `type_name`: "string", "int", "number", "bool", "list", "object" or "any".
    pub fn of_type(type_name: impl Into<String>) -> Self {
        Input(InputSpec {
            r#type: type_name.into(),
            ..InputSpec::default()
        })
    }

    pub fn string() -> Self {
        Self::of_type("string")
    }

    pub fn int() -> Self {
        Self::of_type("int")
    }

    pub fn number() -> Self {
        Self::of_type("number")
    }

    pub fn bool() -> Self {
        Self::of_type("bool")
    }

    pub fn list() -> Self {
        Self::of_type("list")
    }

    pub fn object() -> Self {
        Self::of_type("object")
    }

    pub fn any() -> Self {
        Self::of_type("any")
    }

    /// The value used when the input is not given (without one, the input is required).
    pub fn default(mut self, value: impl Into<serde_json::Value>) -> Self {
        self.0.default = Some(dagmesh_proto::json::to_value(&value.into()));
        self
    }

    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.0.description = text.into();
        self
    }
}

/// A retry policy (`StepSpec.retry`); unset fields take the server's defaults.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Retry(RetryPolicy);

impl Retry {
    /// Total attempts, the first included.
    pub fn attempts(max_attempts: u32) -> Self {
        Retry(RetryPolicy {
            max_attempts,
            ..RetryPolicy::default()
        })
    }

    pub fn initial_backoff(mut self, duration: impl Into<String>) -> Self {
        self.0.initial_backoff = duration.into();
        self
    }

    pub fn max_backoff(mut self, duration: impl Into<String>) -> Self {
        self.0.max_backoff = duration.into();
        self
    }

    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.0.multiplier = multiplier;
        self
    }

    pub fn jitter(mut self, jitter: f64) -> Self {
        self.0.jitter = jitter;
        self
    }

    /// Retry failures the worker marked non-retryable too.
    pub fn retry_non_retryable(mut self) -> Self {
        self.0.retry_non_retryable = true;
        self
    }
}

/// One step: a task, a child workflow, a sleep, an approval or a wait for an event.
#[derive(Debug, Clone)]
#[must_use]
pub struct Step(StepSpec);

impl Step {
    fn new(id: impl Into<String>) -> Self {
        Step(StepSpec {
            id: id.into(),
            ..StepSpec::default()
        })
    }

    /// Runs `task` (`name` or `name@<semver requirement>`) on a worker.
    pub fn task(id: impl Into<String>, task: impl Into<String>) -> Self {
        let mut step = Self::new(id);
        step.0.task = task.into();
        step
    }

    /// Starts a run of workflow `workflow` (`name` or `name@<version>`) and ends with it.
    pub fn workflow(id: impl Into<String>, workflow: impl Into<String>) -> Self {
        let mut step = Self::new(id);
        step.0.workflow = workflow.into();
        step
    }

    /// Waits `duration` ("10m"), durably.
    pub fn sleep(id: impl Into<String>, duration: impl Into<String>) -> Self {
        let mut step = Self::new(id);
        step.0.sleep = duration.into();
        step
    }

    /// Waits for ApproveStep (`dagmesh runs approve`); `message` is what the approver is asked.
    pub fn approval(id: impl Into<String>, message: impl Into<String>) -> Self {
        let mut step = Self::new(id);
        step.0.approval = Some(ApprovalSpec {
            message: message.into(),
            timeout: String::new(),
        });
        step
    }

    /// Waits for an event on `topic` (see [`Step::filter`]).
    pub fn wait_for(id: impl Into<String>, topic: impl Into<String>) -> Self {
        let mut step = Self::new(id);
        step.0.wait_for = Some(WaitForSpec {
            topic: topic.into(),
            ..WaitForSpec::default()
        });
        step
    }

    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// Runs after `step` has succeeded (or was skipped). Repeatable.
    pub fn needs(mut self, step: impl Into<StepId>) -> Self {
        self.0.needs.push(step.into().0);
        self
    }

    /// Input `name` is the value of the CEL expression `expression` (JSON literals are CEL too:
    /// `"42"`, `"'text'"`).
    pub fn input(mut self, name: impl Into<String>, expression: impl Into<String>) -> Self {
        self.0.inputs.insert(name.into(), expression.into());
        self
    }

    /// Input `name` is the constant `value` (written as its JSON text, as YAML does).
    pub fn input_value(
        mut self,
        name: impl Into<String>,
        value: impl Into<serde_json::Value>,
    ) -> Self {
        self.0.inputs.insert(name.into(), value.into().to_string());
        self
    }

    /// The step runs only when this CEL condition holds; otherwise it is skipped.
    pub fn when(mut self, condition: impl Into<String>) -> Self {
        self.0.when = condition.into();
        self
    }

    /// How long one attempt (a task), the approval or the wait may take ("5m").
    pub fn timeout(mut self, duration: impl Into<String>) -> Self {
        let duration = duration.into();
        if let Some(approval) = &mut self.0.approval {
            approval.timeout = duration;
        } else if let Some(wait) = &mut self.0.wait_for {
            wait.timeout = duration;
        } else {
            self.0.timeout = duration;
        }
        self
    }

    /// Which events resume a `wait_for` step: CEL over `event`, `inputs` and upstream steps.
    pub fn filter(mut self, condition: impl Into<String>) -> Self {
        if let Some(wait) = &mut self.0.wait_for {
            wait.filter = condition.into();
        }
        self
    }

    pub fn retry(mut self, retry: Retry) -> Self {
        self.0.retry = Some(retry.0);
        self
    }

    /// A label the worker must carry (exact value).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.0.labels.insert(key.into(), value.into());
        self
    }

    pub fn slots(mut self, slots: u32) -> Self {
        self.0.slots = slots;
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.0.priority = priority;
        self
    }

    pub fn concurrency_key(mut self, resource: impl Into<String>) -> Self {
        self.0.concurrency_key = resource.into();
        self
    }

    pub fn schedule_to_start_timeout(mut self, duration: impl Into<String>) -> Self {
        self.0.schedule_to_start_timeout = duration.into();
        self
    }

    /// Memoizes the task for `ttl`, keyed by the task and its inputs (see [`Step::cache_key`]).
    pub fn cache(mut self, ttl: impl Into<String>) -> Self {
        self.0.cache.get_or_insert_with(CacheSpec::default).ttl = ttl.into();
        self
    }

    /// Memoizes under this CEL key (with the task name) instead of the inputs.
    pub fn cache_key(mut self, key: impl Into<String>) -> Self {
        self.0.cache.get_or_insert_with(CacheSpec::default).key = key.into();
        self
    }

    /// Makes this a map: one task (or child run) per element of this CEL list; item inputs
    /// may read `item` and `index`.
    pub fn for_each(mut self, list: impl Into<String>) -> Self {
        self.0.for_each = list.into();
        self
    }

    pub fn max_parallel(mut self, items: u32) -> Self {
        self.0.max_parallel = items;
        self
    }

    /// A map item that fails leaves `{"error": ...}` in the list instead of failing the map.
    pub fn continue_on_failure(mut self) -> Self {
        self.0.continue_on_failure = true;
        self
    }

    /// The step as the protocol has it.
    pub fn into_spec(self) -> StepSpec {
        self.0
    }
}

/// A workflow being built; see the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct Workflow {
    spec: WorkflowSpec,
}

impl Workflow {
    pub fn new(name: impl Into<String>) -> Self {
        Workflow {
            spec: WorkflowSpec {
                name: name.into(),
                ..WorkflowSpec::default()
            },
        }
    }

    pub fn description(mut self, text: impl Into<String>) -> Self {
        self.spec.description = text.into();
        self
    }

    /// Independent branches keep running after a step fails (the run still fails).
    pub fn continue_on_failure(mut self) -> Self {
        self.spec.continue_on_failure = true;
        self
    }

    /// Declares run input `name`.
    pub fn input(&mut self, name: impl Into<String>, input: Input) -> &mut Self {
        self.spec.inputs.insert(name.into(), input.0);
        self
    }

    /// Adds a step; the returned id is what later steps name in [`Step::needs`].
    pub fn add(&mut self, step: Step) -> StepId {
        let id = StepId(step.0.id.clone());
        self.spec.steps.push(step.0);
        id
    }

    /// A hook that runs after the DAG has ended, whatever the outcome.
    pub fn on_exit(&mut self, step: Step) -> StepId {
        let id = StepId(step.0.id.clone());
        self.spec.on_exit.push(step.0);
        id
    }

    /// A hook that runs after the DAG has succeeded.
    pub fn on_success(&mut self, step: Step) -> StepId {
        let id = StepId(step.0.id.clone());
        self.spec.on_success.push(step.0);
        id
    }

    /// A hook that runs after the DAG has failed.
    pub fn on_failure(&mut self, step: Step) -> StepId {
        let id = StepId(step.0.id.clone());
        self.spec.on_failure.push(step.0);
        id
    }

    /// The spec, after the checks the builder can make on its own: ids given once and not
    /// empty, every need a step of this workflow, hooks without needs.
    pub fn build(self) -> Result<WorkflowSpec, WorkflowError> {
        let spec = self.spec;
        let mut ids = HashSet::new();
        let hooks = spec
            .on_exit
            .iter()
            .chain(&spec.on_success)
            .chain(&spec.on_failure);
        for step in spec.steps.iter().chain(hooks.clone()) {
            if step.id.is_empty() {
                return Err(WorkflowError::EmptyId);
            }
            if !ids.insert(step.id.as_str()) {
                return Err(WorkflowError::DuplicateId(step.id.clone()));
            }
        }
        let steps: HashSet<&str> = spec.steps.iter().map(|s| s.id.as_str()).collect();
        for step in &spec.steps {
            if let Some(need) = step
                .needs
                .iter()
                .find(|need| !steps.contains(need.as_str()))
            {
                return Err(WorkflowError::UnknownNeed {
                    step: step.id.clone(),
                    need: need.clone(),
                });
            }
        }
        if let Some(hook) = hooks.clone().find(|hook| !hook.needs.is_empty()) {
            return Err(WorkflowError::HookWithNeeds(hook.id.clone()));
        }
        Ok(spec)
    }
}
