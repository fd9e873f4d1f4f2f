//! Validation and compilation of a `WorkflowSpec` into the form the runtime executes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use dagmesh_proto::v1::{StepSpec, WorkflowSpec};
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{Map, Value as Json};

use dagmesh_proto::limits::{
    MAX_DURATION_LEN, MAX_EDGES, MAX_ENTRIES, MAX_MAP_ITEMS, MAX_MESSAGE_LEN, MAX_NAME_LEN,
    MAX_PAYLOAD_DEPTH, MAX_SLOTS, MAX_STEPS, MAX_TIMEOUT, MAX_VALUE_LEN, truncate_marked,
};

use crate::cost::{self, Binding, Bindings};
use crate::error::{EvalError, SpecError, SpecErrors};
use crate::expr::{self, EVENT_VAR, EvalBudget, INDEX_VAR, INPUTS_VAR, ITEM_VAR, RUN_VAR};
use crate::inputs::{self, DeclaredInput};
use crate::retry::Retry;
use crate::typecheck;

/// Step ids that cannot be used: `inputs` is the run-inputs variable, `run` is kept for run
/// metadata in expressions.
pub const RESERVED_STEP_IDS: [&str; 2] = [INPUTS_VAR, RUN_VAR];

/// A validated workflow: steps with resolved indexes, compiled expressions and defaults applied.
/// Immutable and `Send + Sync`, to be shared as `Arc<CompiledWorkflow>`.
#[derive(Debug)]
pub struct CompiledWorkflow {
    /// The spec it was compiled from.
    pub spec: WorkflowSpec,
    /// One per spec step, in spec order (`steps[i].index == i`), then the exit hooks
    /// (`on_exit`, `on_success`, `on_failure`, in that order).
    pub steps: Vec<CompiledStep>,
    /// Every step index, each after all the steps it needs; among steps that could go next, the
    /// one declared first.
    pub topo_order: Vec<usize>,
    /// The declared run inputs, sorted by name; empty when the workflow declares none.
    pub inputs: Vec<DeclaredInput>,
    /// The workflow's webhooks (`WorkflowSpec.notifications`), checked.
    pub notifications: Vec<crate::notify::CompiledNotification>,
    by_id: HashMap<String, usize>,
}

impl CompiledWorkflow {
    pub fn step(&self, id: &str) -> Option<&CompiledStep> {
        self.step_index(id).map(|i| &self.steps[i])
    }

    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.by_id.get(id).copied()
    }

    /// Steps that need nothing: the ones a new run starts with.
    pub fn roots(&self) -> impl Iterator<Item = &CompiledStep> {
        self.steps.iter().filter(|s| s.needs.is_empty())
    }

    /// Checks run inputs against the declared ones and fills in defaults (see
    /// [`inputs::check_run_inputs`]); with no declaration, `given` is returned as is.
    pub fn check_run_inputs(
        &self,
        given: Map<String, Json>,
        field: &str,
    ) -> Result<Map<String, Json>, SpecErrors> {
        inputs::check_run_inputs(&self.inputs, given, field)
    }
}

/// When an exit hook runs (see `WorkflowSpec.on_exit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    /// After the DAG, whatever its outcome.
    Exit,
    /// After the DAG, when no step failed.
    Success,
    /// After the DAG, when a step failed.
    Failure,
}

impl Hook {
    /// Whether a hook of this kind runs after a DAG that `failed` (or not).
    pub fn runs_after(self, failed: bool) -> bool {
        match self {
            Hook::Exit => true,
            Hook::Success => !failed,
            Hook::Failure => failed,
        }
    }

    pub fn field(self) -> &'static str {
        match self {
            Hook::Exit => "on_exit",
            Hook::Success => "on_success",
            Hook::Failure => "on_failure",
        }
    }
}

/// What a step does when its needs are done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// Hands a task to a worker (one per item, with `for_each`).
    Task,
    /// Waits this long, then succeeds (`StepSpec.sleep`).
    Sleep(Duration),
    /// Waits for RunService.ApproveStep; fails after `timeout` when set (`StepSpec.approval`).
    Approval {
        message: String,
        timeout: Option<Duration>,
    },
    /// Waits for an event on `topic` that [`CompiledStep::event_filter`] accepts; fails after
    /// `timeout` when set (`StepSpec.wait_for`).
    WaitFor {
        topic: String,
        timeout: Option<Duration>,
    },
    /// Starts a run of another workflow and ends with it (`StepSpec.workflow`); `version`
    /// `None`: the latest when the step starts.
    Child {
        workflow: String,
        version: Option<u32>,
    },
}

/// A memoized step's `cache` (see `CacheSpec`).
#[derive(Debug)]
pub struct StepCache {
    /// `cache.key`; `None`: the task and the evaluated inputs are the key.
    pub key: Option<cel::Program>,
    pub ttl: Duration,
}

/// How long a cache entry may live at most.
pub const MAX_CACHE_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Debug)]
pub struct CompiledStep {
    /// Position in `spec.steps`.
    pub index: usize,
    pub id: String,
    /// The task type, `mesh.build` in `mesh.build@^1.2`.
    pub task_name: String,
    /// `*` when the task names no version.
    pub version_req: semver::VersionReq,
    /// The task text as written.
    pub task: String,
    /// Indexes of the steps this one needs, as listed.
    pub needs: Vec<usize>,
    /// Indexes of the steps that need this one, ascending.
    pub dependants: Vec<usize>,
    /// Input name -> compiled expression, sorted by name.
    pub inputs: Vec<(String, cel::Program)>,
    pub when: Option<cel::Program>,
    pub retry: Retry,
    pub timeout: Option<Duration>,
    /// How long the step may wait READY for a worker before it fails; `None`: for ever.
    pub schedule_to_start_timeout: Option<Duration>,
    pub labels: BTreeMap<String, String>,
    /// At least 1.
    pub slots: u32,
    pub priority: i32,
    /// Shared resource held while an attempt runs (empty: none); see `StepSpec.concurrency_key`.
    pub concurrency_key: String,
    /// The variables the step's expressions read (`inputs` and upstream ids), sorted. Only these
    /// are bound at evaluation, so a step does not pay for converting outputs it never reads.
    pub variables: Vec<String>,
    /// `for_each`: the list a map step expands to; `None` for an ordinary step.
    pub for_each: Option<cel::Program>,
    /// Items of a map dispatched or running at once; 0: all of them.
    pub max_parallel: u32,
    /// A map item that fails for good leaves `{"error": ...}` in the list instead of failing
    /// the step.
    pub continue_on_item_failure: bool,
    pub kind: StepKind,
    /// `wait_for.filter`: which events resume the step (over `event` and the step's variables).
    pub event_filter: Option<cel::Program>,
    /// `cache`: the step is memoized.
    pub cache: Option<StepCache>,
    /// For an exit hook: when it runs. Hooks come after the DAG's steps in `steps`.
    pub hook: Option<Hook>,
}

impl CompiledStep {
    /// Evaluates every input expression. `upstream_outputs` maps step ids to their outputs; an
    /// upstream id that is absent (e.g. a skipped step) is bound to null. Under the default
    /// [`EvalBudget`].
    pub fn evaluate_inputs(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
    ) -> Result<Map<String, Json>, EvalError> {
        self.evaluate_inputs_with(run_inputs, upstream_outputs, &EvalBudget::default())
    }

    /// [`evaluate_inputs`](Self::evaluate_inputs) under `budget`.
    pub fn evaluate_inputs_with(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
        budget: &EvalBudget,
    ) -> Result<Map<String, Json>, EvalError> {
        let bindings = self.bindings(run_inputs, upstream_outputs);
        let mut meter = Meter::new(budget);
        self.inputs_estimated(&bindings, &mut meter)?;
        let ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        self.inputs_in(&ctx, budget)
    }

    /// Evaluates `when`; a step without one always runs. Under the default [`EvalBudget`].
    pub fn evaluate_when(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
    ) -> Result<bool, EvalError> {
        self.evaluate_when_with(run_inputs, upstream_outputs, &EvalBudget::default())
    }

    /// [`evaluate_when`](Self::evaluate_when) under `budget`.
    pub fn evaluate_when_with(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
        budget: &EvalBudget,
    ) -> Result<bool, EvalError> {
        if self.when.is_none() {
            return Ok(true);
        }
        let bindings = self.bindings(run_inputs, upstream_outputs);
        self.when_estimated(&bindings, &mut Meter::new(budget))?;
        let ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        self.when_in(&ctx)
    }

    /// `when`, then the inputs if it holds: `Ok(None)` means the step is skipped. Binds the
    /// variables once for both. Under the default [`EvalBudget`].
    pub fn evaluate(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
    ) -> Result<Option<Map<String, Json>>, EvalError> {
        self.evaluate_with(run_inputs, upstream_outputs, &EvalBudget::default())
    }

    /// [`evaluate`](Self::evaluate) under `budget`, which `when` and the inputs share.
    pub fn evaluate_with(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
        budget: &EvalBudget,
    ) -> Result<Option<Map<String, Json>>, EvalError> {
        let bindings = self.bindings(run_inputs, upstream_outputs);
        let mut meter = Meter::new(budget);
        // Each expression is estimated before anything runs: the point is to refuse the
        // expensive ones without paying for them.
        self.when_estimated(&bindings, &mut meter)?;
        self.inputs_estimated(&bindings, &mut meter)?;
        let ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        if !self.when_in(&ctx)? {
            return Ok(None);
        }
        self.inputs_in(&ctx, budget).map(Some)
    }

    /// Evaluates `cache.key` (with `item` and `index` for an item of a map); `Ok(None)` when
    /// the step has no custom key.
    pub fn evaluate_cache_key_with(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
        item: Option<(&Json, usize)>,
        budget: &EvalBudget,
    ) -> Result<Option<Json>, EvalError> {
        let Some(program) = self.cache.as_ref().and_then(|cache| cache.key.as_ref()) else {
            return Ok(None);
        };
        let error = |message: String| EvalError::CacheKey {
            step: self.id.clone(),
            message,
        };
        let mut bindings = self.bindings(run_inputs, upstream_outputs);
        let position = Json::from(item.map_or(0, |(_, index)| index as u64));
        if let Some((element, _)) = item {
            bindings.vars.push((ITEM_VAR, Binding::Value(element)));
            bindings.vars.push((INDEX_VAR, Binding::Value(&position)));
        }
        Meter::new(budget)
            .charge(program, &bindings)
            .map_err(error)?;
        let mut ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        if let Some((element, index)) = item {
            ctx.add_variable_from_value(ITEM_VAR, expr::to_cel(element));
            ctx.add_variable_from_value(INDEX_VAR, cel::Value::Int(index as i64));
        }
        let value = program
            .execute(&ctx)
            .map_err(|e| error(expr::lowercase_first(e.to_string())))?;
        expr::to_json(&value, budget.max_payload_bytes, MAX_PAYLOAD_DEPTH)
            .map(Some)
            .map_err(error)
    }

    /// Evaluates `for_each` to the list of items, each converted to JSON; the list shares the
    /// budget's payload limit and holds at most [`MAX_MAP_ITEMS`] items. A step without
    /// `for_each` has no items.
    pub fn evaluate_for_each_with(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
        budget: &EvalBudget,
    ) -> Result<Vec<Json>, EvalError> {
        let Some(program) = &self.for_each else {
            return Ok(Vec::new());
        };
        let error = |message: String| EvalError::ForEach {
            step: self.id.clone(),
            message,
        };
        let bindings = self.bindings(run_inputs, upstream_outputs);
        Meter::new(budget)
            .charge(program, &bindings)
            .map_err(error)?;
        let ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        let value = program
            .execute(&ctx)
            .map_err(|e| error(expr::lowercase_first(e.to_string())))?;
        let cel::Value::List(items) = &value else {
            return Err(error(format!(
                "returned {}, expected a list",
                expr::describe(&value)
            )));
        };
        if items.len() > MAX_MAP_ITEMS {
            return Err(error(format!(
                "returned a list of {} items, over the limit of {MAX_MAP_ITEMS} items per step",
                items.len()
            )));
        }
        match expr::to_json(&value, budget.max_payload_bytes, MAX_PAYLOAD_DEPTH) {
            Ok(Json::Array(items)) => Ok(items),
            Ok(_) => Err(error("returned something other than a list".to_owned())),
            Err(message) => Err(error(message)),
        }
    }

    /// An evaluator of the inputs of this map step's items: the run inputs and upstream
    /// outputs are converted once, and each item only binds `item` and `index`.
    pub fn item_inputs<'s>(
        &'s self,
        run_inputs: &'s Map<String, Json>,
        upstream_outputs: &'s HashMap<String, Json>,
        budget: &'s EvalBudget,
    ) -> ItemInputs<'s> {
        ItemInputs {
            step: self,
            ctx: expr::context(&self.variables, run_inputs, upstream_outputs),
            bindings: self.bindings(run_inputs, upstream_outputs),
            budget,
        }
    }

    /// Whether `event` resumes this `wait_for` step: its filter over `event` and the step's
    /// variables (no filter: any event of the topic). Under `budget`.
    pub fn event_matches(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Json>,
        event: &Json,
        budget: &EvalBudget,
    ) -> Result<bool, EvalError> {
        let Some(program) = &self.event_filter else {
            return Ok(true);
        };
        let error = |message: String| EvalError::When {
            step: self.id.clone(),
            message: format!("wait_for.filter: {message}"),
        };
        let mut bindings = self.bindings(run_inputs, upstream_outputs);
        bindings.vars.push((EVENT_VAR, Binding::Value(event)));
        Meter::new(budget)
            .charge(program, &bindings)
            .map_err(error)?;
        let mut ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        ctx.add_variable_from_value(EVENT_VAR, expr::to_cel(event));
        match program.execute(&ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(error(format!(
                "returned {}, expected a bool",
                expr::describe(&other)
            ))),
            Err(e) => Err(error(expr::lowercase_first(e.to_string()))),
        }
    }

    fn bindings<'j>(
        &'j self,
        run_inputs: &'j Map<String, Json>,
        upstream_outputs: &'j HashMap<String, Json>,
    ) -> Bindings<'j> {
        Bindings {
            vars: self
                .variables
                .iter()
                .map(|name| {
                    let binding = if name == INPUTS_VAR {
                        Binding::Object(run_inputs)
                    } else {
                        upstream_outputs
                            .get(name)
                            .map_or(Binding::Null, Binding::Value)
                    };
                    (name.as_str(), binding)
                })
                .collect(),
        }
    }

    fn inputs_estimated(
        &self,
        bindings: &Bindings<'_>,
        meter: &mut Meter,
    ) -> Result<(), EvalError> {
        for (name, program) in &self.inputs {
            meter
                .charge(program, bindings)
                .map_err(|message| EvalError::Input {
                    step: self.id.clone(),
                    input: name.clone(),
                    message,
                })?;
        }
        Ok(())
    }

    fn when_estimated(&self, bindings: &Bindings<'_>, meter: &mut Meter) -> Result<(), EvalError> {
        let Some(program) = &self.when else {
            return Ok(());
        };
        meter
            .charge(program, bindings)
            .map_err(|message| EvalError::When {
                step: self.id.clone(),
                message,
            })
    }

    fn inputs_in(
        &self,
        ctx: &cel::Context<'_, '_>,
        budget: &EvalBudget,
    ) -> Result<Map<String, Json>, EvalError> {
        let mut resolved = Map::new();
        // The inputs together become one payload: one size limit for all of them.
        let mut left = budget.max_payload_bytes;
        for (name, program) in &self.inputs {
            let error = |message: String| EvalError::Input {
                step: self.id.clone(),
                input: name.clone(),
                message,
            };
            let value = program
                .execute(ctx)
                .map_err(|e| error(expr::lowercase_first(e.to_string())))?;
            // One level is taken by the inputs object the value sits in.
            let json = expr::to_json(&value, left, MAX_PAYLOAD_DEPTH.saturating_sub(1)).map_err(
                |message| {
                    if left < budget.max_payload_bytes {
                        error(format!(
                            "{message} (the step's inputs share a payload limit of {} bytes)",
                            budget.max_payload_bytes
                        ))
                    } else {
                        error(message)
                    }
                },
            )?;
            left = left.saturating_sub(cost::weight(&json).min(usize::MAX as u64) as usize);
            resolved.insert(name.clone(), json);
        }
        Ok(resolved)
    }

    fn when_in(&self, ctx: &cel::Context<'_, '_>) -> Result<bool, EvalError> {
        let Some(program) = &self.when else {
            return Ok(true);
        };
        let error = |message: String| EvalError::When {
            step: self.id.clone(),
            message,
        };
        match program.execute(ctx) {
            Ok(cel::Value::Bool(b)) => Ok(b),
            Ok(other) => Err(error(format!(
                "returned {}, expected a bool",
                expr::describe(&other)
            ))),
            Err(e) => Err(error(expr::lowercase_first(e.to_string()))),
        }
    }
}

/// Evaluates the inputs of a map step's items; see [`CompiledStep::item_inputs`].
pub struct ItemInputs<'s> {
    step: &'s CompiledStep,
    ctx: cel::Context<'s, 's>,
    bindings: Bindings<'s>,
    budget: &'s EvalBudget,
}

impl ItemInputs<'_> {
    /// The inputs of item `index`, whose element is `item`, under the step's budget (each item
    /// has a budget of its own).
    pub fn evaluate(&mut self, item: &Json, index: usize) -> Result<Map<String, Json>, EvalError> {
        let position = Json::from(index as u64);
        let mut bindings = Bindings {
            vars: self.bindings.vars.clone(),
        };
        bindings.vars.push((ITEM_VAR, Binding::Value(item)));
        bindings.vars.push((INDEX_VAR, Binding::Value(&position)));
        let mut meter = Meter::new(self.budget);
        self.step.inputs_estimated(&bindings, &mut meter)?;
        self.ctx
            .add_variable_from_value(ITEM_VAR, expr::to_cel(item));
        self.ctx
            .add_variable_from_value(INDEX_VAR, cel::Value::Int(index as i64));
        self.step.inputs_in(&self.ctx, self.budget)
    }
}

/// Work left of a step's [`EvalBudget`] while its expressions are estimated.
struct Meter {
    left: u64,
    budget: u64,
}

impl Meter {
    fn new(budget: &EvalBudget) -> Self {
        Meter {
            left: budget.cost,
            budget: budget.cost,
        }
    }

    fn charge(&mut self, program: &cel::Program, bindings: &Bindings<'_>) -> Result<(), String> {
        let estimate = cost::estimate(program.expression(), bindings, self.budget);
        let cost = expr::check_cost(estimate, self.left, self.budget)?;
        self.left = self.left.saturating_sub(cost);
        Ok(())
    }
}

/// Validates a spec and compiles it. Every problem is reported, in spec order, not just the first.
///
/// The cost is linear in steps + needs + expression size for every usual shape: nothing per step
/// holds more than its own needs, dependants and variables (see [`Reach`]).
pub fn compile(spec: &WorkflowSpec) -> Result<CompiledWorkflow, SpecErrors> {
    // cel's parser recurses through a dozen grammar rules per nesting level of an expression
    // and stops only at about 100 levels: an unoptimised build needs more than a default
    // thread's 2 MiB for 12 levels of brackets. A thread of its own with room for the parser's
    // whole limit costs a few microseconds per workflow (the stack is reserved, not used).
    on_compile_stack(|| compile_here(spec))
        .unwrap_or_else(|error| Err(SpecErrors::single("steps", error)))
}

/// Runs `work` (which compiles expressions) on a thread with [`COMPILE_STACK_BYTES`] of stack.
/// `Err`: the thread could not be started.
pub(crate) fn on_compile_stack<T: Send>(work: impl FnOnce() -> T + Send) -> Result<T, String> {
    let compiled = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("dagmesh-spec-compile".to_owned())
            .stack_size(COMPILE_STACK_BYTES)
            .spawn_scoped(scope, work)
            .map(|thread| thread.join())
    });
    match compiled {
        Ok(Ok(result)) => Ok(result),
        // A panic in there is a bug of this crate or of cel: let it surface as one.
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(error) => Err(format!(
            "cannot start the thread that compiles expressions: {error}"
        )),
    }
}

/// Stack of the thread that compiles a workflow (see [`compile`]).
const COMPILE_STACK_BYTES: usize = 64 * 1024 * 1024;

fn compile_here(spec: &WorkflowSpec) -> Result<CompiledWorkflow, SpecErrors> {
    let mut top_errors = Vec::new();
    check_workflow_name(&spec.name, &mut top_errors);
    // The DAG's steps, then the exit hooks: one list, one namespace of ids.
    let hook_lists = [
        (Hook::Exit, &spec.on_exit),
        (Hook::Success, &spec.on_success),
        (Hook::Failure, &spec.on_failure),
    ];
    let mut all_steps: Vec<StepSpec> = spec.steps.clone();
    let mut paths: Vec<String> = (0..spec.steps.len())
        .map(|i| format!("steps[{i}]"))
        .collect();
    let mut hooks: Vec<Option<Hook>> = vec![None; spec.steps.len()];
    for (hook, list) in hook_lists {
        for (k, step) in list.iter().enumerate() {
            all_steps.push(step.clone());
            paths.push(format!("{}[{k}]", hook.field()));
            hooks.push(Some(hook));
        }
    }
    let all_steps = all_steps.as_slice();
    if spec.steps.is_empty() {
        top_errors.push(SpecError::new(
            "steps",
            "a workflow needs at least one step",
        ));
    }
    // Past these counts nothing else is looked at: the work below grows with them.
    let n = all_steps.len();
    if n > MAX_STEPS {
        top_errors.push(SpecError::new(
            "steps",
            format!("{n} steps, over the limit of {MAX_STEPS}"),
        ));
    }
    let edges = all_steps
        .iter()
        .fold(0usize, |sum, step| sum.saturating_add(step.needs.len()));
    if edges > MAX_EDGES {
        top_errors.push(SpecError::new(
            "steps",
            format!("{edges} needs in all, over the limit of {MAX_EDGES}"),
        ));
    }
    if n > MAX_STEPS || edges > MAX_EDGES {
        return Err(SpecErrors(top_errors));
    }
    let declared = inputs::compile_declared(&spec.inputs, &mut top_errors);
    let notifications =
        crate::notify::compile_notifications("notifications", &spec.notifications, &mut top_errors);
    let declared_names: Option<BTreeSet<&str>> =
        (!spec.inputs.is_empty()).then(|| spec.inputs.keys().map(String::as_str).collect());

    let mut step_errors: Vec<Vec<SpecError>> = vec![Vec::new(); n];

    // Ids first: `needs` and expressions refer to them. Even an invalid id is indexed, so that
    // a step needing it gets no second, misleading "unknown step" error.
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (i, (step, errors)) in all_steps.iter().zip(&mut step_errors).enumerate() {
        check_step_id(&step.id, &format!("{}.id", paths[i]), errors);
        if step.id.is_empty() || step.id.len() > MAX_NAME_LEN {
            continue;
        }
        if let Some(&first) = by_id.get(&step.id) {
            errors.push(SpecError::new(
                format!("{}.id", paths[i]),
                format!(
                    "duplicate step id {:?} (first at {})",
                    step.id, paths[first]
                ),
            ));
        } else {
            by_id.insert(step.id.clone(), i);
        }
    }

    let mut needs: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut tasks = Vec::with_capacity(n);
    for (i, ((step, errors), step_needs)) in all_steps
        .iter()
        .zip(&mut step_errors)
        .zip(&mut needs)
        .enumerate()
    {
        // A sleep or an approval runs no task: its (empty) task is not parsed.
        let waits = !step.sleep.is_empty()
            || step.approval.is_some()
            || step.wait_for.is_some()
            || !step.workflow.is_empty();
        if waits && step.task.is_empty() {
            tasks.push((String::new(), semver::VersionReq::STAR));
        } else {
            tasks.push(parse_task(
                &step.task,
                &format!("{}.task", paths[i]),
                errors,
            ));
        }
        if hooks[i].is_some() && !step.needs.is_empty() {
            errors.push(SpecError::new(
                format!("{}.needs", paths[i]),
                "an exit hook runs after the whole DAG and needs nothing (it may read every step)",
            ));
            continue;
        }
        // A set beside the list: a step may need thousands of others (a fan-in).
        let mut listed = HashSet::with_capacity(step.needs.len());
        for (j, need) in step.needs.iter().enumerate() {
            let path = format!("{}.needs[{j}]", paths[i]);
            if *need == step.id {
                errors.push(SpecError::new(
                    path,
                    format!("step {:?} needs itself", shorten(need)),
                ));
            } else if let Some(&k) = by_id.get(need) {
                if listed.insert(k) {
                    step_needs.push(k);
                } else {
                    errors.push(SpecError::new(path, format!("{need:?} is listed twice")));
                }
            } else {
                errors.push(SpecError::new(
                    path,
                    format!("unknown step {:?}", shorten(need)),
                ));
            }
        }
    }

    let cycle_errors = find_cycles(all_steps, &needs);
    // Without a cycle, steps are compiled in running order, which lets `Reach` reuse what it
    // proved for the steps before; with one, in spec order (the spec is refused anyway).
    let order = if cycle_errors.is_empty() {
        topo_order(&needs)
    } else {
        (0..n).collect()
    };
    let mut reach = Reach::new(&needs, cycle_errors.is_empty().then_some(order.as_slice()));

    let mut compiled: Vec<Option<CompiledStep>> = (0..n).map(|_| None).collect();
    let mut tasks: Vec<Option<(String, semver::VersionReq)>> =
        tasks.into_iter().map(Some).collect();
    for &i in &order {
        let (Some(slot), Some(task), Some(errors)) = (
            compiled.get_mut(i),
            tasks.get_mut(i),
            step_errors.get_mut(i),
        ) else {
            continue;
        };
        let Some(task) = task.take() else { continue };
        *slot = Some(compile_step(
            i,
            &paths[i],
            hooks[i],
            task,
            all_steps,
            &needs,
            &mut reach,
            &by_id,
            (declared_names.as_ref(), &declared),
            spec.steps.len(),
            errors,
        ));
    }

    let errors: Vec<SpecError> = top_errors
        .into_iter()
        .chain(step_errors.into_iter().flatten())
        .chain(cycle_errors)
        .collect();
    if !errors.is_empty() {
        return Err(SpecErrors(errors));
    }

    let mut steps: Vec<CompiledStep> = compiled.into_iter().flatten().collect();
    for (i, step_needs) in needs.iter().enumerate() {
        for &k in step_needs {
            if let Some(step) = steps.get_mut(k) {
                step.dependants.push(i);
            }
        }
    }
    Ok(CompiledWorkflow {
        spec: spec.clone(),
        steps,
        topo_order: order,
        inputs: declared,
        notifications,
        by_id,
    })
}

/// A name as it is quoted back in an error: cut when it is over the name limit, so that an
/// error about a 1 MB name is not itself 1 MB.
fn shorten(name: &str) -> String {
    let mut text = name.to_owned();
    truncate_marked(&mut text, MAX_NAME_LEN + 48);
    text
}

/// Answers "is step `k` upstream of step `i`" without storing anyone's ancestors (that is
/// quadratic: a 10,000-step chain held 50 million ids).
///
/// One backward search from `i` per step answers all of its questions at once and stops when
/// the last one is answered. With a running order it skips steps that run before every step
/// asked about (nothing above them can be one of those), and it remembers for each step one
/// ancestor it proved, so that a long chain whose every step reads the first is linear too.
/// A wide DAG whose steps each read a different far-away ancestor can still cost
/// steps x edges, which the limits on steps and needs bound.
struct Reach<'a> {
    needs: &'a [Vec<usize>],
    /// Position in the running order; `None` with a cycle (no pruning then).
    rank: Option<Vec<usize>>,
    /// `visited[j] == generation`: seen by the current search.
    visited: Vec<u32>,
    /// `wanted[k] == generation`: asked about and not found yet by the current search.
    wanted: Vec<u32>,
    generation: u32,
    /// One ancestor proved for each searched step (`usize::MAX`: none).
    proved: Vec<usize>,
    stack: Vec<usize>,
}

impl<'a> Reach<'a> {
    fn new(needs: &'a [Vec<usize>], order: Option<&[usize]>) -> Self {
        let n = needs.len();
        let rank = order.map(|order| {
            let mut rank = vec![0; n];
            for (r, &i) in order.iter().enumerate() {
                if let Some(slot) = rank.get_mut(i) {
                    *slot = r;
                }
            }
            rank
        });
        Reach {
            needs,
            rank,
            visited: vec![0; n],
            wanted: vec![0; n],
            generation: 0,
            proved: vec![usize::MAX; n],
            stack: Vec::new(),
        }
    }

    /// Which of `targets` are upstream of step `from`, as a flag per target.
    fn upstream(&mut self, from: usize, targets: &[usize]) -> Vec<bool> {
        let mut found = vec![false; targets.len()];
        if targets.is_empty() {
            return found;
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            // After 4 billion searches the stamps start over.
            self.visited.fill(0);
            self.wanted.fill(0);
            self.generation = 1;
        }
        let generation = self.generation;
        let mut missing = 0usize;
        for &k in targets {
            if k != from
                && let Some(w) = self.wanted.get_mut(k)
                && *w != generation
            {
                *w = generation;
                missing += 1;
            }
        }
        let floor = match &self.rank {
            Some(rank) => targets
                .iter()
                .filter_map(|&k| rank.get(k).copied())
                .min()
                .unwrap_or(0),
            None => 0,
        };
        let mut first_proved: Option<usize> = None;
        self.stack.clear();
        if let Some(visited) = self.visited.get_mut(from) {
            *visited = generation;
        }
        self.stack
            .extend(self.needs.get(from).into_iter().flatten());
        while missing > 0
            && let Some(j) = self.stack.pop()
        {
            match self.visited.get_mut(j) {
                Some(v) if *v != generation => *v = generation,
                _ => continue,
            }
            if let Some(rank) = &self.rank
                && rank.get(j).is_some_and(|&r| r < floor)
            {
                continue;
            }
            for k in [Some(j), self.proved.get(j).copied()].into_iter().flatten() {
                if let Some(w) = self.wanted.get_mut(k)
                    && *w == generation
                {
                    // Anything but the generation: no longer wanted.
                    *w = generation.wrapping_sub(1);
                    missing -= 1;
                    // Remember the farthest one: the steps below are the likeliest to ask
                    // about it again (every step of a chain reading the first).
                    let farther = match (&self.rank, first_proved) {
                        (_, None) => true,
                        (Some(rank), Some(best)) => rank.get(k) < rank.get(best),
                        (None, Some(_)) => false,
                    };
                    if farther {
                        first_proved = Some(k);
                    }
                }
            }
            self.stack.extend(self.needs.get(j).into_iter().flatten());
        }
        for (flag, &k) in found.iter_mut().zip(targets) {
            // Found targets were taken off the wanted list; `from` itself is never upstream.
            *flag = k != from && self.wanted.get(k).is_some_and(|&w| w != generation);
        }
        if let (Some(k), Some(slot)) = (first_proved, self.proved.get_mut(from)) {
            *slot = k;
        }
        found
    }
}

fn check_workflow_name(name: &str, errors: &mut Vec<SpecError>) {
    if name.is_empty() {
        errors.push(SpecError::new("name", "workflow name is empty"));
    } else if name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        errors.push(SpecError::new(
            "name",
            format!("invalid workflow name {name:?}: use 1-128 characters of [A-Za-z0-9_.-]"),
        ));
    }
}

fn check_step_id(id: &str, path: &str, errors: &mut Vec<SpecError>) {
    let valid = id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && id
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if id.is_empty() {
        errors.push(SpecError::new(path, "step id is empty"));
    } else if id.len() > MAX_NAME_LEN {
        errors.push(SpecError::new(
            path,
            too_long("step id of ", id.len(), MAX_NAME_LEN),
        ));
    } else if !valid {
        errors.push(SpecError::new(
            path,
            format!(
                "invalid step id {id:?}: use [a-z_][a-z0-9_]* (it is a variable name in expressions)"
            ),
        ));
    } else if RESERVED_STEP_IDS.contains(&id) {
        errors.push(SpecError::new(path, format!("step id {id:?} is reserved")));
    } else if expr::is_type_name(id) {
        errors.push(SpecError::new(
            path,
            format!("step id {id:?} is the name of a CEL type, so expressions could not read it"),
        ));
    }
}

/// One error per cycle: each strongly connected component of more than one step holds at least
/// one cycle, and naming one concrete cycle in it is what the author needs to break it. (A step
/// needing itself is reported at its `needs` entry and kept out of the graph.)
fn find_cycles(all_steps: &[StepSpec], needs: &[Vec<usize>]) -> Vec<SpecError> {
    // Edges point from a step to the steps that need it, the order in which they run.
    let mut graph = DiGraph::<usize, ()>::with_capacity(needs.len(), needs.len());
    let nodes: Vec<NodeIndex> = (0..needs.len()).map(|i| graph.add_node(i)).collect();
    for (i, step_needs) in needs.iter().enumerate() {
        for &k in step_needs {
            graph.add_edge(nodes[k], nodes[i], ());
        }
    }
    // Kosaraju, not Tarjan: petgraph's Tarjan recurses once per step of a path, which a long
    // chain with a cycle turns into a stack overflow.
    if petgraph::algo::toposort(&graph, None).is_ok() {
        return Vec::new();
    }
    let mut components: Vec<Vec<usize>> = petgraph::algo::kosaraju_scc(&graph)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let mut steps: Vec<usize> = c.into_iter().map(|node| graph[node]).collect();
            steps.sort_unstable();
            steps
        })
        .collect();
    components.sort();
    components
        .into_iter()
        .map(|component| {
            let cycle = cycle_through(&graph, &nodes, &component);
            let names: Vec<String> = cycle
                .iter()
                .map(|&i| format!("{:?}", all_steps.get(i).map_or("", |s| s.id.as_str())))
                .collect();
            SpecError::new(
                "steps",
                format!("cycle between steps {}", names.join(" -> ")),
            )
        })
        .collect()
}

/// The shortest cycle from the component's first step back to itself, as step indexes with the
/// first one repeated at the end. Breadth-first within the component, which is strongly
/// connected, so the path exists.
fn cycle_through(
    graph: &DiGraph<usize, ()>,
    nodes: &[NodeIndex],
    component: &[usize],
) -> Vec<usize> {
    let Some(&start) = component.first() else {
        return Vec::new();
    };
    let members: HashSet<usize> = component.iter().copied().collect();
    let mut parent: HashMap<usize, usize> = HashMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(current) = queue.pop_front() {
        let mut next: Vec<usize> = graph.neighbors(nodes[current]).map(|n| graph[n]).collect();
        // Neighbours come out in reverse insertion order; sorting keeps the answer stable.
        next.sort_unstable();
        for step in next {
            if step == start {
                let mut path = vec![start];
                let mut at = current;
                while at != start {
                    path.push(at);
                    match parent.get(&at) {
                        Some(&up) => at = up,
                        None => break,
                    }
                }
                path.push(start);
                path.reverse();
                return path;
            }
            if members.contains(&step) && !parent.contains_key(&step) {
                parent.insert(step, current);
                queue.push_back(step);
            }
        }
    }
    // Not reached: a strongly connected component of several steps has a cycle through each.
    // Naming its steps still helps more than nothing.
    let mut steps = component.to_vec();
    steps.push(start);
    steps
}

/// Kahn's algorithm with the lowest ready index first: any order would be valid, this one keeps
/// independent steps in the order the author wrote them. Only called on an acyclic graph.
fn topo_order(needs: &[Vec<usize>]) -> Vec<usize> {
    let n = needs.len();
    let mut waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, step_needs) in needs.iter().enumerate() {
        for &k in step_needs {
            dependants[k].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| waiting[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &dependants[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    order
}

#[expect(
    clippy::too_many_arguments,
    reason = "one step, its place in the workflow and the tables compiled before it"
)]
fn compile_step(
    i: usize,
    at: &str,
    hook: Option<Hook>,
    (task_name, version_req): (String, semver::VersionReq),
    all_steps: &[StepSpec],
    needs: &[Vec<usize>],
    reach: &mut Reach<'_>,
    by_id: &HashMap<String, usize>,
    (declared_inputs, declared_types): (Option<&BTreeSet<&str>>, &[DeclaredInput]),
    dag_len: usize,
    errors: &mut Vec<SpecError>,
) -> CompiledStep {
    let step = &all_steps[i];
    let is_map = !step.for_each.trim().is_empty();
    let mut scope = Scope {
        step_id: &step.id,
        index: i,
        by_id,
        declared_inputs,
        declared_types,
        item_variables: false,
        hook: hook.is_some(),
        event_variable: false,
        dag_len,
        variables: BTreeSet::new(),
        references: Vec::new(),
    };
    // The list is evaluated before there is an item: `item` and `index` are not in its scope.
    let for_each = if is_map {
        scope.compile_returning(
            format!("{at}.for_each"),
            &step.for_each,
            typecheck::Wanted::List,
            errors,
        )
    } else {
        None
    };
    if !is_map {
        if step.max_parallel > 0 {
            errors.push(SpecError::new(
                format!("{at}.max_parallel"),
                "only a map step (with for_each) has max_parallel",
            ));
        }
        if step.continue_on_failure {
            errors.push(SpecError::new(
                format!("{at}.continue_on_failure"),
                "only a map step (with for_each) has continue_on_failure; a workflow's \
                 continue_on_failure is set at the top of the file",
            ));
        }
    } else if step.max_parallel as usize > MAX_MAP_ITEMS {
        errors.push(SpecError::new(
            format!("{at}.max_parallel"),
            format!(
                "{} is over the limit of {MAX_MAP_ITEMS} (the most items a map may have)",
                step.max_parallel
            ),
        ));
    }

    let entries = |field: &str, count: usize, errors: &mut Vec<SpecError>| {
        if count > MAX_ENTRIES {
            errors.push(SpecError::new(
                format!("{at}.{field}"),
                format!("{count} entries, over the limit of {MAX_ENTRIES}"),
            ));
            false
        } else {
            true
        }
    };

    let mut inputs = Vec::new();
    if entries("inputs", step.inputs.len(), errors) {
        let mut input_names: Vec<(&String, &String)> = step.inputs.iter().collect();
        input_names.sort();
        inputs.reserve(input_names.len());
        for (name, text) in input_names {
            if name.is_empty() {
                errors.push(SpecError::new(format!("{at}.inputs"), "empty input name"));
                continue;
            }
            if name.len() > MAX_NAME_LEN {
                errors.push(SpecError::new(
                    format!("{at}.inputs"),
                    too_long("input name of ", name.len(), MAX_NAME_LEN),
                ));
                continue;
            }
            let path = format!("{at}.inputs.{name}");
            scope.item_variables = is_map;
            if let Some(program) = scope.compile(path, text, errors) {
                inputs.push((name.clone(), program));
            }
            scope.item_variables = false;
        }
    }
    let when = if step.when.trim().is_empty() {
        None
    } else {
        scope.compile_returning(
            format!("{at}.when"),
            &step.when,
            typecheck::Wanted::Bool,
            errors,
        )
    };
    let event_filter = match &step.wait_for {
        Some(wait) if !wait.filter.trim().is_empty() => {
            scope.event_variable = true;
            let path = format!("{at}.wait_for.filter");
            let program =
                scope.compile_returning(path, &wait.filter, typecheck::Wanted::Bool, errors);
            scope.event_variable = false;
            program
        }
        _ => None,
    };
    let cache = step.cache.as_ref().map(|cache| {
        let key = if cache.key.trim().is_empty() {
            None
        } else {
            scope.item_variables = is_map;
            let program = scope.compile(format!("{at}.cache.key"), &cache.key, errors);
            scope.item_variables = false;
            program
        };
        let path = format!("{at}.cache.ttl");
        let ttl = match parse_duration(&cache.ttl) {
            _ if cache.ttl.is_empty() => {
                errors.push(SpecError::new(
                    path,
                    "required: how long an entry is reused, e.g. \"1h\"",
                ));
                Duration::ZERO
            }
            Ok(ttl) if ttl.is_zero() => {
                errors.push(SpecError::new(path, "must be longer than zero"));
                ttl
            }
            Ok(ttl) if ttl > MAX_CACHE_TTL => {
                errors.push(SpecError::new(
                    path,
                    format!("{:?} is over the limit of 366 days", cache.ttl),
                ));
                ttl
            }
            Ok(ttl) => ttl,
            Err(message) => {
                errors.push(SpecError::new(path, message));
                Duration::ZERO
            }
        };
        StepCache { key, ttl }
    });
    scope.check_references(reach, errors);

    let retry = step.retry.as_ref().map_or_else(Retry::default, |policy| {
        Retry::from_proto(policy, &format!("{at}.retry"), errors)
    });

    let timeout = optional_timeout(&step.timeout, &format!("{at}.timeout"), errors);
    let schedule_to_start_timeout = optional_timeout(
        &step.schedule_to_start_timeout,
        &format!("{at}.schedule_to_start_timeout"),
        errors,
    );

    let mut labels = BTreeMap::new();
    if entries("labels", step.labels.len(), errors) {
        let mut sorted: Vec<(&String, &String)> = step.labels.iter().collect();
        sorted.sort();
        for (key, value) in sorted {
            let path = format!("{at}.labels");
            if key.is_empty() {
                errors.push(SpecError::new(path, "empty label key"));
            } else if key.len() > MAX_NAME_LEN {
                errors.push(SpecError::new(
                    path,
                    too_long("label key of ", key.len(), MAX_NAME_LEN),
                ));
            } else if value.len() > MAX_VALUE_LEN {
                errors.push(SpecError::new(
                    format!("{path}.{key}"),
                    too_long("", value.len(), MAX_VALUE_LEN),
                ));
            } else {
                labels.insert(key.clone(), value.clone());
            }
        }
    }

    let key = &step.concurrency_key;
    let key_path = format!("{at}.concurrency_key");
    if key.len() > MAX_NAME_LEN {
        errors.push(SpecError::new(
            key_path,
            too_long("", key.len(), MAX_NAME_LEN),
        ));
    } else if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        errors.push(SpecError::new(
            key_path,
            format!("invalid resource name {key:?}: use [A-Za-z0-9_.-]+"),
        ));
    }

    if step.slots > MAX_SLOTS {
        errors.push(SpecError::new(
            format!("{at}.slots"),
            format!("{} slots, over the limit of {MAX_SLOTS}", step.slots),
        ));
    }

    let kind = step_kind(at, step, errors);

    CompiledStep {
        index: i,
        id: step.id.clone(),
        task_name,
        version_req,
        task: step.task.clone(),
        needs: needs.get(i).cloned().unwrap_or_default(),
        dependants: Vec::new(),
        inputs,
        when,
        retry,
        timeout,
        schedule_to_start_timeout,
        labels,
        slots: step.slots.clamp(1, MAX_SLOTS),
        priority: step.priority,
        concurrency_key: step.concurrency_key.clone(),
        variables: scope.variables.into_iter().collect(),
        for_each,
        max_parallel: step.max_parallel.min(MAX_MAP_ITEMS as u32),
        continue_on_item_failure: step.continue_on_failure,
        kind,
        event_filter,
        cache,
        hook,
    }
}

/// Task, child workflow, sleep, approval or wait_for: exactly one, and the task-only fields only
/// on a task (`for_each` also on a child workflow).
fn step_kind(at: &str, step: &StepSpec, errors: &mut Vec<SpecError>) -> StepKind {
    let set: Vec<&str> = [
        (!step.task.is_empty()).then_some("task"),
        (!step.workflow.is_empty()).then_some("workflow"),
        (!step.sleep.is_empty()).then_some("sleep"),
        step.approval.is_some().then_some("approval"),
        step.wait_for.is_some().then_some("wait_for"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if set.len() > 1 {
        errors.push(SpecError::new(
            at.to_owned(),
            format!(
                "has {}; a step is exactly one of task, workflow, sleep, approval and wait_for",
                set.join(" and ")
            ),
        ));
        return StepKind::Task;
    }
    let kind = match set.first() {
        Some(&"sleep") => {
            let path = format!("{at}.sleep");
            match optional_timeout(&step.sleep, &path, errors) {
                Some(duration) => StepKind::Sleep(duration),
                None => return StepKind::Task,
            }
        }
        Some(&"approval") => {
            let approval = step.approval.clone().unwrap_or_default();
            if approval.message.len() > MAX_MESSAGE_LEN {
                errors.push(SpecError::new(
                    format!("{at}.approval.message"),
                    too_long("", approval.message.len(), MAX_MESSAGE_LEN),
                ));
            }
            let timeout =
                optional_timeout(&approval.timeout, &format!("{at}.approval.timeout"), errors);
            StepKind::Approval {
                message: approval.message,
                timeout,
            }
        }
        Some(&"wait_for") => {
            let wait = step.wait_for.clone().unwrap_or_default();
            let topic_path = format!("{at}.wait_for.topic");
            if wait.topic.is_empty() {
                errors.push(SpecError::new(topic_path, "topic is empty"));
            } else if wait.topic.len() > MAX_NAME_LEN {
                errors.push(SpecError::new(
                    topic_path,
                    too_long("", wait.topic.len(), MAX_NAME_LEN),
                ));
            }
            let timeout =
                optional_timeout(&wait.timeout, &format!("{at}.wait_for.timeout"), errors);
            StepKind::WaitFor {
                topic: wait.topic,
                timeout,
            }
        }
        Some(&"workflow") => {
            let (workflow, version) =
                parse_child(&step.workflow, &format!("{at}.workflow"), errors);
            StepKind::Child { workflow, version }
        }
        _ => return StepKind::Task,
    };
    let what = match set.first().copied().unwrap_or("sleep") {
        "workflow" => "child workflow",
        other => other,
    };
    let child = matches!(kind, StepKind::Child { .. });
    let task_only = [
        ("for_each", !step.for_each.is_empty() && !child),
        ("retry", step.retry.is_some()),
        ("timeout", !step.timeout.is_empty()),
        (
            "schedule_to_start_timeout",
            !step.schedule_to_start_timeout.is_empty(),
        ),
        ("labels", !step.labels.is_empty()),
        ("slots", step.slots > 0),
        ("concurrency_key", !step.concurrency_key.is_empty()),
        ("cache", step.cache.is_some()),
    ];
    for (field, present) in task_only {
        if present {
            errors.push(SpecError::new(
                format!("{at}.{field}"),
                format!("a {what} step has no {field}: it runs no task"),
            ));
        }
    }
    kind
}

/// `what` is empty or ends with a space: `input name of 300 bytes, over the limit of 128`.
pub(crate) fn too_long(what: &str, len: usize, max: usize) -> String {
    format!("{what}{len} bytes, over the limit of {max}")
}

/// An optional timeout: empty is `None`; otherwise in (0, [`MAX_TIMEOUT`]].
fn optional_timeout(text: &str, path: &str, errors: &mut Vec<SpecError>) -> Option<Duration> {
    if text.is_empty() {
        return None;
    }
    match parse_duration(text) {
        Ok(d) if d.is_zero() => {
            errors.push(SpecError::new(path, "must be longer than zero"));
            None
        }
        Ok(d) if d > MAX_TIMEOUT => {
            errors.push(SpecError::new(
                path,
                format!(
                    "{text:?} is over the limit of {}",
                    humantime::format_duration(MAX_TIMEOUT)
                ),
            ));
            None
        }
        Ok(d) => Some(d),
        Err(message) => {
            errors.push(SpecError::new(path, message));
            None
        }
    }
}

/// Parses a duration text, refusing before humantime sees it anything that could overflow it
/// (humantime 2.4 panics on a sum that lands exactly on `u64::MAX` seconds): at most
/// [`MAX_DURATION_LEN`] bytes and numbers of at most 12 digits, which keeps any sum below
/// 10^13 years. The error is the message, without the path.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.len() > MAX_DURATION_LEN {
        return Err(format!(
            "duration text of {} bytes, over the limit of {MAX_DURATION_LEN}",
            text.len()
        ));
    }
    let longest_number = text
        .split(|c: char| !c.is_ascii_digit())
        .map(str::len)
        .max()
        .unwrap_or(0);
    if longest_number > 12 {
        return Err(format!(
            "invalid duration {text:?}: a number of {longest_number} digits, over the limit of 12"
        ));
    }
    humantime::parse_duration(text).map_err(|err| format!("invalid duration {text:?}: {err}"))
}

/// What the expressions of one step may read, and the step variables they read, checked
/// together once all of the step's expressions are compiled.
struct Scope<'a> {
    step_id: &'a str,
    index: usize,
    by_id: &'a HashMap<String, usize>,
    /// The declared run inputs, when the workflow declares them: `inputs.<name>` must name one.
    declared_inputs: Option<&'a BTreeSet<&'a str>>,
    /// The declared inputs with their types, for [`typecheck`].
    declared_types: &'a [DeclaredInput],
    /// Whether `item` and `index` are in scope (the inputs of a map step).
    item_variables: bool,
    /// An exit hook: every step is upstream of it, and `run` is in scope.
    hook: bool,
    /// Whether `event` is in scope (a `wait_for` filter).
    event_variable: bool,
    /// Steps of the DAG (hooks come after them).
    dag_len: usize,
    /// `inputs` and step ids read, sorted.
    variables: BTreeSet<String>,
    /// Every step variable read, as (position of its provisional "not upstream" error in the
    /// step's errors, step index); [`Scope::check_references`] drops the errors that are wrong.
    references: Vec<(usize, usize)>,
}

impl Scope<'_> {
    /// Compiles an expression and checks the names it reads.
    fn compile(
        &mut self,
        path: String,
        text: &str,
        errors: &mut Vec<SpecError>,
    ) -> Option<cel::Program> {
        let program = match expr::compile(text) {
            Ok(program) => program,
            Err(message) => {
                errors.push(SpecError::new(path, message));
                return None;
            }
        };
        if let Some(declared) = self.declared_inputs {
            for field in expr::input_fields(&program) {
                if !declared.contains(field.as_str()) {
                    let known: Vec<&str> = declared.iter().copied().collect();
                    errors.push(SpecError::new(
                        path.clone(),
                        format!(
                            "reads inputs.{} which the workflow does not declare (declared: {})",
                            shorten(&field),
                            known.join(", ")
                        ),
                    ));
                }
            }
        }
        for name in expr::free_variables(&program) {
            let message = if name == INPUTS_VAR {
                self.variables.insert(name);
                continue;
            } else if (self.item_variables && (name == ITEM_VAR || name == INDEX_VAR))
                || (self.event_variable && name == EVENT_VAR)
            {
                continue;
            } else if self.hook && name == RUN_VAR {
                self.variables.insert(name);
                continue;
            } else if name == self.step_id {
                format!("references its own step {name:?} (only upstream steps can be read)")
            } else if let Some(&k) = self.by_id.get(&name) {
                // Provisional, so that the error lands in spec order if it stands.
                self.references.push((errors.len(), k));
                let message = format!(
                    "references step {name:?} which is not upstream of {:?} (add it to needs)",
                    self.step_id
                );
                self.variables.insert(name);
                message
            } else if name == ITEM_VAR || name == INDEX_VAR {
                format!(
                    "unknown variable {name:?} (`item` and `index` exist only in the inputs of a \
                     step with for_each)"
                )
            } else {
                format!("unknown variable {name:?}")
            };
            errors.push(SpecError::new(path.clone(), message));
        }
        for problem in typecheck::check(&program, self.declared_types) {
            errors.push(SpecError::new(path.clone(), problem));
        }
        Some(program)
    }

    /// Like [`compile`](Self::compile), for an expression that must return `wanted` (a `when`,
    /// a filter, a `for_each`): refused when it surely returns something else.
    fn compile_returning(
        &mut self,
        path: String,
        text: &str,
        wanted: typecheck::Wanted,
        errors: &mut Vec<SpecError>,
    ) -> Option<cel::Program> {
        let program = self.compile(path.clone(), text, errors)?;
        if let Some(got) = typecheck::wrong_result(&program, self.declared_types, wanted) {
            let want = match wanted {
                typecheck::Wanted::Bool => "a bool",
                typecheck::Wanted::List => "a list",
            };
            errors.push(SpecError::new(path, format!("returns {got}, not {want}")));
        }
        Some(program)
    }

    /// Drops the provisional errors of the step variables that are upstream after all.
    fn check_references(&mut self, reach: &mut Reach<'_>, errors: &mut Vec<SpecError>) {
        let targets: Vec<usize> = self.references.iter().map(|&(_, k)| k).collect();
        let upstream = if self.hook {
            // A hook runs after every step of the DAG (reading another hook is refused).
            targets.iter().map(|&k| k < self.dag_len).collect()
        } else {
            reach.upstream(self.index, &targets)
        };
        let fine: HashSet<usize> = self
            .references
            .iter()
            .zip(upstream)
            .filter(|(_, upstream)| *upstream)
            .map(|(&(position, _), _)| position)
            .collect();
        let mut position = 0;
        errors.retain(|_| {
            let keep = !fine.contains(&position);
            position += 1;
            keep
        });
        self.references.clear();
    }
}

/// `StepSpec.workflow`: "name" or "name@<version number>".
fn parse_child(text: &str, path: &str, errors: &mut Vec<SpecError>) -> (String, Option<u32>) {
    let (name, version) = match text.split_once('@') {
        Some((name, version)) => (name, Some(version)),
        None => (text, None),
    };
    check_name(name, path, "workflow", "@<version number>", errors);
    let version = match version {
        None => None,
        Some(version) => match version.parse::<u32>() {
            Ok(number) if number > 0 => Some(number),
            _ => {
                errors.push(SpecError::new(
                    path,
                    format!(
                        "invalid workflow version {:?}: a version number (1, 2, ...) is expected",
                        shorten(version)
                    ),
                ));
                None
            }
        },
    };
    (name.to_owned(), version)
}

/// The name part of a task or child workflow reference: 1-128 of [A-Za-z0-9_.-]; `what` is
/// "task" or "workflow", `suffix` what may follow the `@`.
fn check_name(name: &str, path: &str, what: &str, suffix: &str, errors: &mut Vec<SpecError>) {
    if name.len() > MAX_NAME_LEN {
        errors.push(SpecError::new(
            path,
            too_long(&format!("{what} name of "), name.len(), MAX_NAME_LEN),
        ));
    } else if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        errors.push(SpecError::new(
            path,
            format!(
                "invalid {what} name {:?}: use [A-Za-z0-9_.-]+, then optionally {suffix}",
                shorten(name)
            ),
        ));
    }
}

/// `name@<semver requirement>` or `name` (any version).
fn parse_task(task: &str, path: &str, errors: &mut Vec<SpecError>) -> (String, semver::VersionReq) {
    if task.is_empty() {
        errors.push(SpecError::new(path, "task is empty"));
        return (String::new(), semver::VersionReq::STAR);
    }
    if task.len() > MAX_VALUE_LEN {
        errors.push(SpecError::new(
            path,
            too_long("task of ", task.len(), MAX_VALUE_LEN),
        ));
        return (String::new(), semver::VersionReq::STAR);
    }
    let (name, requirement) = match task.split_once('@') {
        Some((name, requirement)) => (name, Some(requirement)),
        None => (task, None),
    };
    check_name(name, path, "task", "@<version requirement>", errors);
    let version_req = match requirement {
        None => semver::VersionReq::STAR,
        Some(requirement) => match semver::VersionReq::parse(requirement) {
            Ok(req) => req,
            Err(err) => {
                errors.push(SpecError::new(
                    path,
                    format!("invalid version requirement {requirement:?}: {err}"),
                ));
                semver::VersionReq::STAR
            }
        },
    };
    (name.to_owned(), version_req)
}
