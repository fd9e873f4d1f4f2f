//! CEL for the scheduler: the same language as workflow inputs (`cel`), with the scheduler's
//! variables (`tick`, `schedule`, `event`, `topic`, `partition`).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::objects::{Key, Map};
use cel::{Context, Env, Program, Value};
use serde_json::Value as Json;

/// Building the standard environment is slow; build it once.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| Arc::new(Env::stdlib()));

/// Compiles `text`; the error says why on one line.
pub(crate) fn compile(text: &str) -> Result<Program, String> {
    ENV.compile(text).map_err(|errors| {
        let details: Vec<String> = errors
            .errors
            .iter()
            .map(|e| {
                let msg = e.msg.strip_prefix("Syntax error: ").unwrap_or(&e.msg);
                format!("{msg} at column {}", e.pos.1)
            })
            .collect();
        format!("invalid expression: {}", details.join("; "))
    })
}

/// Evaluates `program` with `variables` bound, as JSON.
pub(crate) fn eval(program: &Program, variables: &[(&str, &Json)]) -> Result<Json, String> {
    let mut ctx = Context::with_env(Arc::clone(&ENV));
    for (name, value) in variables {
        ctx.add_variable_from_value(*name, to_cel(value));
    }
    let value = program
        .execute(&ctx)
        .map_err(|err| lowercase(err.to_string()))?;
    value
        .json()
        .map_err(|_| format!("a {} value cannot be converted to JSON", value.type_of()))
}

/// Evaluates each `name -> expression` of an input map; errors name the input (`inputs.day: ...`).
pub(crate) fn eval_inputs(
    inputs: &HashMap<String, String>,
    variables: &[(&str, &Json)],
) -> Result<serde_json::Map<String, Json>, String> {
    let mut names: Vec<_> = inputs.keys().collect();
    names.sort();
    let mut out = serde_json::Map::new();
    for name in names {
        let program = compile(&inputs[name]).map_err(|e| format!("inputs.{name}: {e}"))?;
        let value = eval(&program, variables).map_err(|e| format!("inputs.{name}: {e}"))?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// Checks that every input expression parses; errors name the input.
pub(crate) fn check_inputs(inputs: &HashMap<String, String>) -> Result<(), String> {
    let mut names: Vec<_> = inputs.keys().collect();
    names.sort();
    for name in names {
        compile(&inputs[name]).map_err(|e| format!("inputs.{name}: {e}"))?;
    }
    Ok(())
}

fn to_cel(value: &Json) -> Value {
    match value {
        Json::Null => Value::Null,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Json::String(s) => Value::String(Arc::new(s.clone())),
        Json::Array(items) => Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Json::Object(map) => {
            let entries: HashMap<Key, Value> = map
                .iter()
                .map(|(k, v)| (Key::String(Arc::new(k.clone())), to_cel(v)))
                .collect();
            Value::Map(Map {
                map: Arc::new(entries),
            })
        }
    }
}

fn lowercase(message: String) -> String {
    let mut chars = message.chars();
    match chars.next() {
        Some(first) if first.is_uppercase() => first.to_lowercase().chain(chars).collect(),
        _ => message,
    }
}
