//! CEL glue: compiling expressions, finding the variables they read, and moving values between
//! JSON and CEL.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::objects::{Key, Map};
use cel::{Context, Env, ParseErrors, Program, Value};
use dagmesh_proto::limits::{
    MAX_COMPREHENSION_DEPTH, MAX_EXPRESSION_LEN, MAX_EXPRESSION_NODES, MAX_PAYLOAD_DEPTH,
};

use crate::cost::{self, Binding, Bindings};
use serde_json::Value as Json;

/// The variable bound to the run's inputs.
pub const INPUTS_VAR: &str = "inputs";
/// In a `wait_for` filter: the event's payload.
pub const EVENT_VAR: &str = "event";
/// In an exit hook's expressions: the run (state, error, failed steps).
pub const RUN_VAR: &str = "run";
/// In the inputs of a map step's items: the list element of the item, and its position.
pub const ITEM_VAR: &str = "item";
pub const INDEX_VAR: &str = "index";

/// One standard environment for every program: building it registers the whole standard library,
/// which is too slow to repeat per evaluation.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// Levels of one expression's syntax tree (macro expansions included). cel evaluates the tree
/// recursively, and a chain like `a + a + ... + a` is one level for the parser's own limit but
/// a hundred levels of tree: this keeps evaluation within a 2 MiB thread stack even in an
/// unoptimised build (which overflows at about 50 levels).
pub const MAX_EXPRESSION_TREE_DEPTH: usize = 32;

/// Compiles an expression, or says why it does not parse, on one line. Refuses expressions over
/// the static limits: length, node count, tree depth and comprehension nesting.
pub(crate) fn compile(text: &str) -> Result<Program, String> {
    if text.len() > MAX_EXPRESSION_LEN {
        return Err(format!(
            "expression of {} bytes, over the limit of {MAX_EXPRESSION_LEN}",
            text.len()
        ));
    }
    let program = ENV
        .compile(text)
        .map_err(|errors| describe_parse_errors(text, &errors))?;
    check_shape(program.expression())?;
    Ok(program)
}

/// Node count, tree depth and comprehension nesting, walked with an explicit stack so that a
/// degenerate tree cannot overflow this walk either. Also refuses the two node kinds that cel
/// panics on if it ever evaluates them (an unparsed node, a struct field in a map literal).
fn check_shape(root: &IdedExpr) -> Result<(), String> {
    let mut nodes = 0usize;
    let mut deepest_comprehension = 0usize;
    // (node, tree depth, comprehensions around it)
    let mut stack: Vec<(&IdedExpr, usize, usize)> = vec![(root, 1, 0)];
    while let Some((expr, depth, comprehensions)) = stack.pop() {
        nodes += 1;
        if nodes > MAX_EXPRESSION_NODES {
            return Err(format!(
                "expression of more than {MAX_EXPRESSION_NODES} nodes, over the limit of \
                 {MAX_EXPRESSION_NODES} (macros count with their expansion)"
            ));
        }
        if depth > MAX_EXPRESSION_TREE_DEPTH {
            return Err(format!(
                "expression nested more than {MAX_EXPRESSION_TREE_DEPTH} levels deep, over the \
                 limit of {MAX_EXPRESSION_TREE_DEPTH} (split long chains of operators with \
                 parentheses)"
            ));
        }
        let next = depth + 1;
        match &expr.expr {
            Expr::Unspecified => return Err("invalid expression: incomplete".to_owned()),
            Expr::Literal(_) | Expr::Ident(_) => {}
            Expr::Select(select) => stack.push((&select.operand, next, comprehensions)),
            Expr::Call(call) => {
                stack.extend(
                    call.target
                        .as_deref()
                        .into_iter()
                        .chain(&call.args)
                        .map(|e| (e, next, comprehensions)),
                );
            }
            Expr::List(list) => {
                stack.extend(list.elements.iter().map(|e| (e, next, comprehensions)));
            }
            Expr::Map(map) => {
                for entry in &map.entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(entry) => {
                            stack.push((&entry.key, next, comprehensions));
                            stack.push((&entry.value, next, comprehensions));
                        }
                        EntryExpr::StructField(_) => {
                            return Err("invalid expression: a field in a map literal".to_owned());
                        }
                    }
                }
            }
            Expr::Struct(s) => {
                for entry in &s.entries {
                    match &entry.expr {
                        EntryExpr::StructField(field) => {
                            stack.push((&field.value, next, comprehensions));
                        }
                        EntryExpr::MapEntry(entry) => {
                            stack.push((&entry.key, next, comprehensions));
                            stack.push((&entry.value, next, comprehensions));
                        }
                    }
                }
            }
            Expr::Comprehension(comp) => {
                let inside = comprehensions + 1;
                if inside > MAX_COMPREHENSION_DEPTH {
                    return Err(format!(
                        "more than {MAX_COMPREHENSION_DEPTH} comprehensions (map, filter, all, \
                         exists, exists_one) nested in one another, over the limit of \
                         {MAX_COMPREHENSION_DEPTH}"
                    ));
                }
                deepest_comprehension = deepest_comprehension.max(inside);
                // The range and the initial accumulator are evaluated outside the loop.
                stack.push((&comp.iter_range, next, comprehensions));
                stack.push((&comp.accu_init, next, comprehensions));
                stack.push((&comp.loop_cond, next, inside));
                stack.push((&comp.loop_step, next, inside));
                stack.push((&comp.result, next, comprehensions));
            }
        }
    }
    Ok(())
}

fn describe_parse_errors(text: &str, errors: &ParseErrors) -> String {
    let multi_line = text.contains('\n');
    let details: Vec<String> = errors
        .errors
        .iter()
        .map(|e| {
            // Positions are 1-based.
            let (line, column) = e.pos;
            let msg = e.msg.strip_prefix("Syntax error: ").unwrap_or(&e.msg);
            if multi_line {
                format!("{msg} at line {line}, column {column}")
            } else {
                format!("{msg} at column {column}")
            }
        })
        .collect();
    format!("invalid expression: {}", details.join("; "))
}

/// The names an expression reads from its environment: identifiers that are not bound by a
/// comprehension (`x` in `list.map(x, x * 2)`) and are not type names (`int`, `string`...).
///
/// `Program::references()` is not enough: it also reports comprehension variables, which would
/// make `fetch.images.map(i, i + '.jpg')` look like it reads a variable `i`.
/// Whether `name` is a CEL type (`int`, `list`, ...): as a variable it would read the type.
pub(crate) fn is_type_name(name: &str) -> bool {
    ENV.types().find_type(name).is_some()
}

pub(crate) fn free_variables(program: &Program) -> BTreeSet<String> {
    let mut free = BTreeSet::new();
    let mut bound = Vec::new();
    walk(program.expression(), &mut bound, &mut free);
    free
}

/// The fields of the run inputs an expression reads by name (`inputs.room_id`), where the
/// name `inputs` is not rebound by a comprehension.
pub(crate) fn input_fields(program: &Program) -> BTreeSet<String> {
    let mut fields = BTreeSet::new();
    let mut stack = vec![(program.expression(), false)];
    while let Some((expr, shadowed)) = stack.pop() {
        match &expr.expr {
            Expr::Unspecified | Expr::Literal(_) | Expr::Ident(_) => {}
            Expr::Select(select) => {
                if !shadowed
                    && let Expr::Ident(name) = &select.operand.expr
                    && name == INPUTS_VAR
                {
                    fields.insert(select.field.clone());
                }
                stack.push((&select.operand, shadowed));
            }
            Expr::Call(call) => {
                stack.extend(call.target.iter().map(|t| (&**t, shadowed)));
                stack.extend(call.args.iter().map(|a| (a, shadowed)));
            }
            Expr::List(list) => stack.extend(list.elements.iter().map(|e| (e, shadowed))),
            Expr::Map(map) => {
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(e) = &entry.expr {
                        stack.push((&e.key, shadowed));
                        stack.push((&e.value, shadowed));
                    }
                }
            }
            Expr::Struct(_) => {}
            Expr::Comprehension(comp) => {
                let rebinds = rebinds_inputs(comp);
                stack.push((&comp.iter_range, shadowed));
                stack.push((&comp.accu_init, shadowed));
                for inner in [&comp.result, &comp.loop_cond, &comp.loop_step] {
                    stack.push((inner, shadowed || rebinds));
                }
            }
        }
    }
    fields
}

/// Whether a comprehension names one of its variables `inputs`, hiding the run inputs inside.
pub(crate) fn rebinds_inputs(comp: &cel::common::ast::ComprehensionExpr) -> bool {
    [
        Some(&comp.accu_var),
        Some(&comp.iter_var),
        comp.iter_var2.as_ref(),
    ]
    .into_iter()
    .flatten()
    .any(|var| var == INPUTS_VAR)
}

fn walk<'e>(expr: &'e IdedExpr, bound: &mut Vec<&'e str>, free: &mut BTreeSet<String>) {
    match &expr.expr {
        Expr::Unspecified | Expr::Literal(_) => {}
        Expr::Ident(name) => {
            // Macros name their accumulators `@result` and such; they are never user variables.
            if !name.starts_with('@')
                && !bound.contains(&name.as_str())
                && ENV.types().find_type(name).is_none()
            {
                free.insert(name.clone());
            }
        }
        Expr::Select(select) => walk(&select.operand, bound, free),
        Expr::Call(call) => {
            if let Some(target) = &call.target {
                walk(target, bound, free);
            }
            for arg in &call.args {
                walk(arg, bound, free);
            }
        }
        Expr::List(list) => {
            for element in &list.elements {
                walk(element, bound, free);
            }
        }
        Expr::Map(map) => walk_entries(map.entries.iter().map(|e| &e.expr), bound, free),
        Expr::Struct(s) => walk_entries(s.entries.iter().map(|e| &e.expr), bound, free),
        Expr::Comprehension(comp) => {
            // The range and the initial accumulator are evaluated outside the loop's scope.
            walk(&comp.iter_range, bound, free);
            walk(&comp.accu_init, bound, free);
            let depth = bound.len();
            bound.push(&comp.accu_var);
            walk(&comp.result, bound, free);
            bound.push(&comp.iter_var);
            if let Some(var) = &comp.iter_var2 {
                bound.push(var);
            }
            walk(&comp.loop_cond, bound, free);
            walk(&comp.loop_step, bound, free);
            bound.truncate(depth);
        }
    }
}

fn walk_entries<'e>(
    entries: impl Iterator<Item = &'e EntryExpr>,
    bound: &mut Vec<&'e str>,
    free: &mut BTreeSet<String>,
) {
    for entry in entries {
        match entry {
            EntryExpr::StructField(field) => walk(&field.value, bound, free),
            EntryExpr::MapEntry(entry) => {
                walk(&entry.key, bound, free);
                walk(&entry.value, bound, free);
            }
        }
    }
}

/// A context binding `variables`: `inputs` to the run inputs, every other name to that step's
/// outputs, or to null when the caller has none (so that `x == null` can test for it).
pub(crate) fn context<'a>(
    variables: &[String],
    run_inputs: &serde_json::Map<String, Json>,
    upstream_outputs: &HashMap<String, Json>,
) -> Context<'a, 'a> {
    let mut ctx = Context::with_env(Arc::clone(&ENV));
    for name in variables {
        let value = if name == INPUTS_VAR {
            map_to_cel(run_inputs)
        } else {
            upstream_outputs.get(name).map_or(Value::Null, to_cel)
        };
        ctx.add_variable_from_value(name.as_str(), value);
    }
    ctx
}

/// JSON to CEL. Whole numbers become `int` (or `uint` above `i64::MAX`) so that `inputs.count + 1`
/// type-checks; other numbers become `double`.
pub(crate) fn to_cel(value: &Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::Int(i)
            } else if let Some(u) = n.as_u64() {
                Value::UInt(u)
            } else {
                Value::Float(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(map) => map_to_cel(map),
    }
}

fn map_to_cel(map: &serde_json::Map<String, Json>) -> Value {
    let entries: std::collections::HashMap<Key, Value> = map
        .iter()
        .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v)))
        .collect();
    Value::Map(Map {
        map: Arc::new(entries),
    })
}

/// CEL to JSON; map keys become strings, bytes base64. Stops as soon as the result passes
/// `max_bytes` (approximate encoded size: nodes plus string bytes) or `max_depth` levels,
/// before building it: a list of lists shared by `Arc` is small in CEL and can be huge as JSON.
pub(crate) fn to_json(value: &Value, max_bytes: usize, max_depth: usize) -> Result<Json, String> {
    let mut left = max_bytes;
    to_json_in(value, &mut left, max_bytes, max_depth, 1)
}

fn to_json_in(
    value: &Value,
    left: &mut usize,
    max_bytes: usize,
    max_depth: usize,
    depth: usize,
) -> Result<Json, String> {
    // Depth is checked before descending, so this recursion is at most `max_depth` deep.
    if depth > max_depth {
        return Err(format!(
            "the result is nested deeper than the limit of {max_depth} levels"
        ));
    }
    let spend = |left: &mut usize, bytes: usize| {
        *left = left
            .checked_sub(bytes.saturating_add(1))
            .ok_or_else(|| format!("the result is over the {max_bytes}-byte payload limit"))?;
        Ok::<(), String>(())
    };
    Ok(match value {
        Value::List(items) => {
            spend(left, 0)?;
            let mut out = Vec::with_capacity(items.len().min(*left));
            for item in items.iter() {
                out.push(to_json_in(item, left, max_bytes, max_depth, depth + 1)?);
            }
            Json::Array(out)
        }
        Value::Map(map) => {
            spend(left, 0)?;
            let mut out = serde_json::Map::new();
            for (key, item) in map.map.iter() {
                let key = key.to_string();
                spend(left, key.len())?;
                out.insert(
                    key,
                    to_json_in(item, left, max_bytes, max_depth, depth + 1)?,
                );
            }
            Json::Object(out)
        }
        Value::String(s) => {
            spend(left, s.len())?;
            Json::String(s.as_str().to_owned())
        }
        Value::Bytes(b) => {
            spend(left, b.len().saturating_mul(4) / 3)?;
            value
                .json()
                .map_err(|_| "bytes cannot be converted to JSON".to_owned())?
        }
        Value::Int(_) | Value::UInt(_) | Value::Float(_) | Value::Bool(_) | Value::Null => {
            spend(left, 8)?;
            value
                .json()
                .map_err(|_| format!("a {} value cannot be converted to JSON", value.type_of()))?
        }
        other => {
            spend(left, 8)?;
            other
                .json()
                .map_err(|_| format!("a {} value cannot be converted to JSON", other.type_of()))?
        }
    })
}

/// A value as the user would write it, for error messages: `string "yes"`, cut short.
pub(crate) fn describe(value: &Value) -> String {
    match to_json(value, 256, MAX_PAYLOAD_DEPTH) {
        Ok(json) => format!("{} {json}", value.type_of()),
        Err(_) => value.type_of().to_string(),
    }
}

/// CEL's messages start with a capital letter; ours are lowercase, as they follow a colon.
pub(crate) fn lowercase_first(message: String) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) if first.is_uppercase() => first.to_lowercase().chain(chars).collect(),
        _ => message,
    }
}

/// Evaluates `program` with JSON variables, for expressions that live outside workflow specs
/// (e.g. the key of a concurrency limit). Same conversions and the same default budget as step
/// inputs ([`EvalBudget::default`]).
pub fn evaluate_json(program: &cel::Program, variables: &[(&str, &Json)]) -> Result<Json, String> {
    let budget = EvalBudget::default();
    let bindings = Bindings {
        vars: variables
            .iter()
            .map(|&(name, value)| (name, Binding::Value(value)))
            .collect(),
    };
    check_cost(
        cost::estimate(program.expression(), &bindings, budget.cost),
        budget.cost,
        budget.cost,
    )?;
    let mut ctx = Context::with_env(Arc::clone(&ENV));
    for (name, value) in variables {
        ctx.add_variable_from_value(*name, to_cel(value));
    }
    let value = program
        .execute(&ctx)
        .map_err(|e| lowercase_first(e.to_string()))?;
    to_json(&value, budget.max_payload_bytes, MAX_PAYLOAD_DEPTH)
}

/// Refuses an estimate over what is `left` of a `budget`, naming both.
pub(crate) fn check_cost(estimate: Option<u64>, left: u64, budget: u64) -> Result<u64, String> {
    let within = |e: &u64| *e <= left;
    match estimate {
        Some(e) if within(&e) => Ok(e),
        Some(e) if left == budget => Err(format!(
            "estimated cost of {e} units, over the budget of {budget}; refused before evaluating"
        )),
        Some(e) => Err(format!(
            "estimated cost of {e} units, over the {left} left of the step's budget of \
             {budget}; refused before evaluating"
        )),
        None => Err(format!(
            "estimated cost over the budget of {budget} (the values it reads are too large); \
             refused before evaluating"
        )),
    }
}

/// What one step's expressions may cost at evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvalBudget {
    /// Estimated work units for all of a step's expressions together (see
    /// [`MAX_EXPRESSION_COST`](dagmesh_proto::limits::MAX_EXPRESSION_COST)); an expression whose
    /// estimate does not fit in what is left is refused before it runs.
    pub cost: u64,
    /// Size of one input's value, approximately as encoded (nodes plus string bytes); its
    /// conversion to JSON stops at this size.
    pub max_payload_bytes: usize,
}

impl Default for EvalBudget {
    fn default() -> Self {
        EvalBudget {
            cost: dagmesh_proto::limits::MAX_EXPRESSION_COST,
            max_payload_bytes: dagmesh_proto::limits::DEFAULT_MAX_PAYLOAD_BYTES,
        }
    }
}
