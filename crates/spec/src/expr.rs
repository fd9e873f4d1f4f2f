//! CEL glue: compiling expressions, finding the variables they read, and moving values between
//! JSON and CEL.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, LazyLock};

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::objects::{Key, Map};
use cel::{Context, Env, ParseErrors, Program, Value};
use serde_json::Value as Json;

/// The variable bound to the run's inputs.
pub const INPUTS_VAR: &str = "inputs";

/// One standard environment for every program: building it registers the whole standard library,
/// which is too slow to repeat per evaluation.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// Compiles an expression, or says why it does not parse, on one line.
pub(crate) fn compile(text: &str) -> Result<Program, String> {
    ENV.compile(text)
        .map_err(|errors| describe_parse_errors(text, &errors))
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
pub(crate) fn free_variables(program: &Program) -> BTreeSet<String> {
    let mut free = BTreeSet::new();
    let mut bound = Vec::new();
    walk(program.expression(), &mut bound, &mut free);
    free
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
    upstream_outputs: &HashMap<String, serde_json::Map<String, Json>>,
) -> Context<'a, 'a> {
    let mut ctx = Context::with_env(Arc::clone(&ENV));
    for name in variables {
        let value = if name == INPUTS_VAR {
            map_to_cel(run_inputs)
        } else {
            upstream_outputs.get(name).map_or(Value::Null, map_to_cel)
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

/// CEL to JSON; map keys become strings, bytes base64.
pub(crate) fn to_json(value: &Value) -> Result<Json, String> {
    value
        .json()
        .map_err(|_| format!("a {} value cannot be converted to JSON", value.type_of()))
}

/// A value as the user would write it, for error messages: `string "yes"`.
pub(crate) fn describe(value: &Value) -> String {
    match value.json() {
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
/// (e.g. the key of a concurrency limit). Same conversions as step inputs.
pub fn evaluate_json(program: &cel::Program, variables: &[(&str, &Json)]) -> Result<Json, String> {
    let mut ctx = Context::with_env(Arc::clone(&ENV));
    for (name, value) in variables {
        ctx.add_variable_from_value(*name, to_cel(value));
    }
    let value = program
        .execute(&ctx)
        .map_err(|e| lowercase_first(e.to_string()))?;
    to_json(&value)
}
