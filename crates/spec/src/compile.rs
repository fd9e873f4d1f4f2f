//! Validation and compilation of a `WorkflowSpec` into the form the runtime executes.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet, VecDeque};
use std::time::Duration;

use dagmesh_proto::v1::{StepSpec, WorkflowSpec};
use petgraph::graph::{DiGraph, NodeIndex};
use serde_json::{Map, Value as Json};

use crate::error::{EvalError, SpecError, SpecErrors};
use crate::expr::{self, INPUTS_VAR};
use crate::retry::Retry;

/// Step ids that cannot be used: `inputs` is the run-inputs variable, `run` is kept for run
/// metadata in expressions.
pub const RESERVED_STEP_IDS: [&str; 2] = [INPUTS_VAR, "run"];

/// A validated workflow: steps with resolved indexes, compiled expressions and defaults applied.
/// Immutable and `Send + Sync`, to be shared as `Arc<CompiledWorkflow>`.
#[derive(Debug)]
pub struct CompiledWorkflow {
    /// The spec it was compiled from.
    pub spec: WorkflowSpec,
    /// One per spec step, in spec order (`steps[i].index == i`).
    pub steps: Vec<CompiledStep>,
    /// Every step index, each after all the steps it needs; among steps that could go next, the
    /// one declared first.
    pub topo_order: Vec<usize>,
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
}

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
    /// Ids of every transitive ancestor, in spec order: the step variables its expressions may
    /// read.
    pub upstream_ids: Vec<String>,
    /// Input name -> compiled expression, sorted by name.
    pub inputs: Vec<(String, cel::Program)>,
    pub when: Option<cel::Program>,
    pub retry: Retry,
    pub timeout: Option<Duration>,
    pub labels: BTreeMap<String, String>,
    /// At least 1.
    pub slots: u32,
    pub priority: i32,
    /// Shared resource held while an attempt runs (empty: none); see `StepSpec.concurrency_key`.
    pub concurrency_key: String,
    /// The variables the step's expressions read (`inputs` and upstream ids), sorted. Only these
    /// are bound at evaluation, so a step does not pay for converting outputs it never reads.
    pub variables: Vec<String>,
}

impl CompiledStep {
    /// Evaluates every input expression. `upstream_outputs` maps step ids to their outputs; an
    /// upstream id that is absent (e.g. a skipped step) is bound to null.
    pub fn evaluate_inputs(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Map<String, Json>>,
    ) -> Result<Map<String, Json>, EvalError> {
        let ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        self.inputs_in(&ctx)
    }

    /// Evaluates `when`; a step without one always runs.
    pub fn evaluate_when(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Map<String, Json>>,
    ) -> Result<bool, EvalError> {
        if self.when.is_none() {
            return Ok(true);
        }
        let ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        self.when_in(&ctx)
    }

    /// `when`, then the inputs if it holds: `Ok(None)` means the step is skipped. Binds the
    /// variables once for both.
    pub fn evaluate(
        &self,
        run_inputs: &Map<String, Json>,
        upstream_outputs: &HashMap<String, Map<String, Json>>,
    ) -> Result<Option<Map<String, Json>>, EvalError> {
        let ctx = expr::context(&self.variables, run_inputs, upstream_outputs);
        if !self.when_in(&ctx)? {
            return Ok(None);
        }
        self.inputs_in(&ctx).map(Some)
    }

    fn inputs_in(&self, ctx: &cel::Context<'_, '_>) -> Result<Map<String, Json>, EvalError> {
        let mut resolved = Map::new();
        for (name, program) in &self.inputs {
            let error = |message: String| EvalError::Input {
                step: self.id.clone(),
                input: name.clone(),
                message,
            };
            let value = program
                .execute(ctx)
                .map_err(|e| error(expr::lowercase_first(e.to_string())))?;
            resolved.insert(name.clone(), expr::to_json(&value).map_err(error)?);
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

/// Validates a spec and compiles it. Every problem is reported, in spec order, not just the first.
pub fn compile(spec: &WorkflowSpec) -> Result<CompiledWorkflow, SpecErrors> {
    let mut top_errors = Vec::new();
    check_workflow_name(&spec.name, &mut top_errors);
    if spec.steps.is_empty() {
        top_errors.push(SpecError::new(
            "steps",
            "a workflow needs at least one step",
        ));
    }

    let n = spec.steps.len();
    let mut step_errors: Vec<Vec<SpecError>> = vec![Vec::new(); n];

    // Ids first: `needs` and expressions refer to them. Even an invalid id is indexed, so that
    // a step needing it gets no second, misleading "unknown step" error.
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (i, step) in spec.steps.iter().enumerate() {
        let errors = &mut step_errors[i];
        check_step_id(&step.id, &format!("steps[{i}].id"), errors);
        if step.id.is_empty() {
            continue;
        }
        if let Some(&first) = by_id.get(&step.id) {
            errors.push(SpecError::new(
                format!("steps[{i}].id"),
                format!("duplicate step id {:?} (first at steps[{first}])", step.id),
            ));
        } else {
            by_id.insert(step.id.clone(), i);
        }
    }

    let mut needs: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut tasks = Vec::with_capacity(n);
    for (i, step) in spec.steps.iter().enumerate() {
        tasks.push(parse_task(
            &step.task,
            &format!("steps[{i}].task"),
            &mut step_errors[i],
        ));
        for (j, need) in step.needs.iter().enumerate() {
            let path = format!("steps[{i}].needs[{j}]");
            if *need == step.id {
                step_errors[i].push(SpecError::new(path, format!("step {need:?} needs itself")));
            } else if let Some(&k) = by_id.get(need) {
                if needs[i].contains(&k) {
                    step_errors[i].push(SpecError::new(path, format!("{need:?} is listed twice")));
                } else {
                    needs[i].push(k);
                }
            } else {
                step_errors[i].push(SpecError::new(path, format!("unknown step {need:?}")));
            }
        }
    }

    let cycle_errors = find_cycles(spec, &needs);
    let ancestors: Vec<Vec<usize>> = (0..n).map(|i| ancestors(i, &needs)).collect();

    let mut steps = Vec::with_capacity(n);
    for (i, task) in tasks.into_iter().enumerate() {
        steps.push(compile_step(
            i,
            task,
            &spec.steps,
            &needs,
            &ancestors[i],
            &by_id,
            &mut step_errors[i],
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

    for (i, step_needs) in needs.iter().enumerate() {
        for &k in step_needs {
            steps[k].dependants.push(i);
        }
    }
    let topo_order = topo_order(&needs);
    Ok(CompiledWorkflow {
        spec: spec.clone(),
        steps,
        topo_order,
        by_id,
    })
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
    } else if !valid {
        errors.push(SpecError::new(
            path,
            format!(
                "invalid step id {id:?}: use [a-z_][a-z0-9_]* (it is a variable name in expressions)"
            ),
        ));
    } else if RESERVED_STEP_IDS.contains(&id) {
        errors.push(SpecError::new(path, format!("step id {id:?} is reserved")));
    }
}

/// One error per cycle: each strongly connected component of more than one step holds at least
/// one cycle, and naming one concrete cycle in it is what the author needs to break it. (A step
/// needing itself is reported at its `needs` entry and kept out of the graph.)
fn find_cycles(spec: &WorkflowSpec, needs: &[Vec<usize>]) -> Vec<SpecError> {
    // Edges point from a step to the steps that need it, the order in which they run.
    let mut graph = DiGraph::<usize, ()>::with_capacity(needs.len(), needs.len());
    let nodes: Vec<NodeIndex> = (0..needs.len()).map(|i| graph.add_node(i)).collect();
    for (i, step_needs) in needs.iter().enumerate() {
        for &k in step_needs {
            graph.add_edge(nodes[k], nodes[i], ());
        }
    }
    if petgraph::algo::toposort(&graph, None).is_ok() {
        return Vec::new();
    }
    let mut components: Vec<Vec<usize>> = petgraph::algo::tarjan_scc(&graph)
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
                .map(|&i| format!("{:?}", spec.steps[i].id))
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
    let start = component[0];
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
                    at = parent[&at];
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
    unreachable!("a strongly connected component of several steps has a cycle through each")
}

/// Transitive ancestors of step `i`, ascending; never `i` itself, even inside a cycle.
fn ancestors(i: usize, needs: &[Vec<usize>]) -> Vec<usize> {
    let mut seen = vec![false; needs.len()];
    let mut stack = needs[i].clone();
    while let Some(k) = stack.pop() {
        if !std::mem::replace(&mut seen[k], true) {
            stack.extend(&needs[k]);
        }
    }
    seen[i] = false;
    (0..needs.len()).filter(|&k| seen[k]).collect()
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

fn compile_step(
    i: usize,
    (task_name, version_req): (String, semver::VersionReq),
    all_steps: &[StepSpec],
    needs: &[Vec<usize>],
    ancestors: &[usize],
    by_id: &HashMap<String, usize>,
    errors: &mut Vec<SpecError>,
) -> CompiledStep {
    let step = &all_steps[i];

    let upstream_ids: Vec<String> = ancestors.iter().map(|&k| all_steps[k].id.clone()).collect();
    let scope = Scope {
        step_id: &step.id,
        upstream_ids: &upstream_ids,
        by_id,
    };
    let mut variables = BTreeSet::new();

    let mut input_names: Vec<&String> = step.inputs.keys().collect();
    input_names.sort();
    let mut inputs = Vec::with_capacity(input_names.len());
    for name in input_names {
        let path = format!("steps[{i}].inputs.{name}");
        if name.is_empty() {
            errors.push(SpecError::new(
                format!("steps[{i}].inputs"),
                "empty input name",
            ));
            continue;
        }
        if let Some(program) = scope.compile(path, &step.inputs[name], &mut variables, errors) {
            inputs.push((name.clone(), program));
        }
    }
    let when = if step.when.trim().is_empty() {
        None
    } else {
        scope.compile(
            format!("steps[{i}].when"),
            &step.when,
            &mut variables,
            errors,
        )
    };

    let retry = step.retry.as_ref().map_or_else(Retry::default, |policy| {
        Retry::from_proto(policy, &format!("steps[{i}].retry"), errors)
    });

    let timeout = if step.timeout.is_empty() {
        None
    } else {
        let path = format!("steps[{i}].timeout");
        match humantime::parse_duration(&step.timeout) {
            Ok(d) if d.is_zero() => {
                errors.push(SpecError::new(path, "must be longer than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(err) => {
                errors.push(SpecError::new(
                    path,
                    format!("invalid duration {:?}: {err}", step.timeout),
                ));
                None
            }
        }
    };

    if step.labels.keys().any(String::is_empty) {
        errors.push(SpecError::new(
            format!("steps[{i}].labels"),
            "empty label key",
        ));
    }
    let key = &step.concurrency_key;
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    {
        errors.push(SpecError::new(
            format!("steps[{i}].concurrency_key"),
            format!("invalid resource name {key:?}: use [A-Za-z0-9_.-]+"),
        ));
    }

    CompiledStep {
        index: i,
        id: step.id.clone(),
        task_name,
        version_req,
        task: step.task.clone(),
        needs: needs[i].clone(),
        dependants: Vec::new(),
        upstream_ids,
        inputs,
        when,
        retry,
        timeout,
        labels: step
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        slots: step.slots.max(1),
        priority: step.priority,
        concurrency_key: step.concurrency_key.clone(),
        variables: variables.into_iter().collect(),
    }
}

/// What the expressions of one step may read.
struct Scope<'a> {
    step_id: &'a str,
    upstream_ids: &'a [String],
    by_id: &'a HashMap<String, usize>,
}

impl Scope<'_> {
    /// Compiles an expression and checks every variable it reads; the good ones are added to
    /// `variables`.
    fn compile(
        &self,
        path: String,
        text: &str,
        variables: &mut BTreeSet<String>,
        errors: &mut Vec<SpecError>,
    ) -> Option<cel::Program> {
        let program = match expr::compile(text) {
            Ok(program) => program,
            Err(message) => {
                errors.push(SpecError::new(path, message));
                return None;
            }
        };
        for name in expr::free_variables(&program) {
            let problem = if name == INPUTS_VAR || self.upstream_ids.contains(&name) {
                None
            } else if name == self.step_id {
                Some(format!(
                    "references its own step {name:?} (only upstream steps can be read)"
                ))
            } else if self.by_id.contains_key(&name) {
                Some(format!(
                    "references step {name:?} which is not upstream of {:?} (add it to needs)",
                    self.step_id
                ))
            } else {
                Some(format!("unknown variable {name:?}"))
            };
            match problem {
                Some(message) => errors.push(SpecError::new(path.clone(), message)),
                None => {
                    variables.insert(name);
                }
            }
        }
        Some(program)
    }
}

/// `name@<semver requirement>` or `name` (any version).
fn parse_task(task: &str, path: &str, errors: &mut Vec<SpecError>) -> (String, semver::VersionReq) {
    if task.is_empty() {
        errors.push(SpecError::new(path, "task is empty"));
        return (String::new(), semver::VersionReq::STAR);
    }
    let (name, requirement) = match task.split_once('@') {
        Some((name, requirement)) => (name, Some(requirement)),
        None => (task, None),
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        errors.push(SpecError::new(
            path,
            format!("invalid task name {name:?}: use [A-Za-z0-9_.-]+, then optionally @<version requirement>"),
        ));
    }
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
