//! Typed run inputs: the `inputs:` a workflow declares, and the check of a run's inputs against
//! them (at SubmitRun, and for every run a schedule, trigger or backfill starts).

use std::collections::HashMap;
use std::fmt;

use dagmesh_proto::limits::{MAX_DESCRIPTION_LEN, MAX_ENTRIES, MAX_NAME_LEN};
use dagmesh_proto::v1::InputSpec;
use serde_json::{Map, Value as Json};

use crate::error::{SpecError, SpecErrors};

/// The type of a declared input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputType {
    String,
    /// A whole number (JSON numbers without a fraction, e.g. `8` or `8.0`).
    Int,
    /// Any number.
    Number,
    Bool,
    List,
    Object,
    Any,
}

impl InputType {
    pub const NAMES: [&'static str; 7] =
        ["string", "int", "number", "bool", "list", "object", "any"];

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "string" => Self::String,
            "int" => Self::Int,
            "number" => Self::Number,
            "bool" => Self::Bool,
            "list" => Self::List,
            "object" => Self::Object,
            "any" => Self::Any,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Int => "int",
            Self::Number => "number",
            Self::Bool => "bool",
            Self::List => "list",
            Self::Object => "object",
            Self::Any => "any",
        }
    }

    pub fn accepts(self, value: &Json) -> bool {
        match self {
            Self::String => value.is_string(),
            Self::Int => match value {
                Json::Number(n) => {
                    n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
                }
                _ => false,
            },
            Self::Number => value.is_number(),
            Self::Bool => value.is_boolean(),
            Self::List => value.is_array(),
            Self::Object => value.is_object(),
            Self::Any => true,
        }
    }
}

impl fmt::Display for InputType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One declared run input.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredInput {
    pub name: String,
    pub kind: InputType,
    /// `None`: the input is required.
    pub default: Option<Json>,
    pub description: String,
}

/// Checks the `inputs:` declaration of a workflow; the result is sorted by name.
pub(crate) fn compile_declared(
    declared: &HashMap<String, InputSpec>,
    errors: &mut Vec<SpecError>,
) -> Vec<DeclaredInput> {
    if declared.len() > MAX_ENTRIES {
        errors.push(SpecError::new(
            "inputs",
            format!(
                "{} inputs declared, over the limit of {MAX_ENTRIES}",
                declared.len()
            ),
        ));
        return Vec::new();
    }
    let mut names: Vec<&String> = declared.keys().collect();
    names.sort();
    let mut compiled = Vec::with_capacity(names.len());
    for name in names {
        let input = &declared[name];
        if name.len() > MAX_NAME_LEN {
            errors.push(SpecError::new(
                "inputs",
                format!(
                    "input name of {} bytes, over the limit of {MAX_NAME_LEN}",
                    name.len()
                ),
            ));
            continue;
        }
        let path = format!("inputs.{name}");
        let valid_name = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            errors.push(SpecError::new(
                &path,
                format!(
                    "invalid input name {name:?}: use [A-Za-z_][A-Za-z0-9_]* (it is read as \
                     inputs.<name> in expressions)"
                ),
            ));
            continue;
        }
        let kind = if input.r#type.is_empty() {
            InputType::Any
        } else {
            match InputType::parse(&input.r#type) {
                Some(kind) => kind,
                None => {
                    let mut text = input.r#type.clone();
                    dagmesh_proto::limits::truncate_marked(&mut text, MAX_NAME_LEN);
                    errors.push(SpecError::new(
                        format!("{path}.type"),
                        format!(
                            "unknown type {text:?}: use one of {}",
                            InputType::NAMES.join(", ")
                        ),
                    ));
                    continue;
                }
            }
        };
        if input.description.len() > MAX_DESCRIPTION_LEN {
            errors.push(SpecError::new(
                format!("{path}.description"),
                format!(
                    "{} bytes, over the limit of {MAX_DESCRIPTION_LEN}",
                    input.description.len()
                ),
            ));
        }
        let default = input.default.as_ref().map(dagmesh_proto::json::from_value);
        if let Some(value) = &default
            && !kind.accepts(value)
        {
            errors.push(SpecError::new(
                format!("{path}.default"),
                format!("{} is not of type {kind}", describe(value)),
            ));
        }
        compiled.push(DeclaredInput {
            name: name.clone(),
            kind,
            default,
            description: input.description.clone(),
        });
    }
    compiled
}

/// The inputs `spec` declares, sorted by name, leaving out any that do not check (a stored
/// version was checked when it was applied). For callers that need the declaration without
/// compiling the steps, e.g. the scheduler.
pub fn declared_inputs(spec: &dagmesh_proto::v1::WorkflowSpec) -> Vec<DeclaredInput> {
    compile_declared(&spec.inputs, &mut Vec::new())
}

/// Checks `given` against `declared`: every required input present, every given one declared
/// and of its type; defaults are filled in. Errors name `<field>.<input>`. With no declaration
/// anything goes and `given` comes back unchanged.
pub fn check_run_inputs(
    declared: &[DeclaredInput],
    mut given: Map<String, Json>,
    field: &str,
) -> Result<Map<String, Json>, SpecErrors> {
    if declared.is_empty() {
        return Ok(given);
    }
    let mut errors = Vec::new();
    for input in declared {
        let path = format!("{field}.{}", input.name);
        match given.get(&input.name) {
            Some(value) if !input.kind.accepts(value) => errors.push(SpecError::new(
                path,
                format!("{} is not of type {}", describe(value), input.kind),
            )),
            Some(_) => {}
            None => match &input.default {
                Some(default) => {
                    given.insert(input.name.clone(), default.clone());
                }
                None => errors.push(SpecError::new(
                    path,
                    format!("required input of type {} is missing", input.kind),
                )),
            },
        }
    }
    let mut extra: Vec<&String> = given
        .keys()
        .filter(|name| declared.iter().all(|input| &input.name != *name))
        .collect();
    extra.sort();
    // Named one by one up to a point: 4 MiB of made-up keys must not make a 4 MiB error.
    const NAMED: usize = 10;
    let unnamed = extra.len().saturating_sub(NAMED);
    for name in extra.into_iter().take(NAMED) {
        let mut shown = name.clone();
        dagmesh_proto::limits::truncate_marked(&mut shown, MAX_NAME_LEN);
        let known: Vec<&str> = declared.iter().map(|i| i.name.as_str()).collect();
        errors.push(SpecError::new(
            format!("{field}.{shown}"),
            format!(
                "the workflow declares no input {shown:?} (it takes {})",
                known.join(", ")
            ),
        ));
    }
    if unnamed > 0 {
        errors.push(SpecError::new(
            field,
            format!("and {unnamed} more inputs the workflow does not declare"),
        ));
    }
    if errors.is_empty() {
        Ok(given)
    } else {
        Err(SpecErrors(errors))
    }
}

/// A value as an error names it: its type, and short values themselves.
fn describe(value: &Json) -> String {
    match value {
        Json::Null => "null".to_owned(),
        Json::Bool(b) => format!("the bool {b}"),
        Json::Number(n) => format!("the number {n}"),
        Json::String(s) if s.len() <= 64 => format!("the string {s:?}"),
        Json::String(s) => format!("a string of {} bytes", s.len()),
        Json::Array(items) => format!("a list of {} items", items.len()),
        Json::Object(map) => format!("an object of {} keys", map.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn declared() -> Vec<DeclaredInput> {
        let spec: HashMap<String, InputSpec> = [
            (
                "room_id".to_owned(),
                InputSpec {
                    r#type: "string".into(),
                    ..InputSpec::default()
                },
            ),
            (
                "image_count".to_owned(),
                InputSpec {
                    r#type: "int".into(),
                    default: Some(dagmesh_proto::json::to_value(&json!(8))),
                    ..InputSpec::default()
                },
            ),
        ]
        .into();
        let mut errors = Vec::new();
        let compiled = compile_declared(&spec, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        compiled
    }

    #[test]
    fn defaults_are_filled_in_and_types_checked() {
        let given = json!({"room_id": "r1"}).as_object().unwrap().clone();
        let checked = check_run_inputs(&declared(), given, "inputs").unwrap();
        assert_eq!(json!(checked), json!({"room_id": "r1", "image_count": 8}));

        let given = json!({"image_count": "eight", "colour": 1})
            .as_object()
            .unwrap()
            .clone();
        let errors = check_run_inputs(&declared(), given, "inputs")
            .unwrap_err()
            .to_string();
        assert!(
            errors.contains("inputs.image_count: the string \"eight\" is not of type int"),
            "{errors}"
        );
        assert!(
            errors.contains("inputs.room_id: required input of type string is missing"),
            "{errors}"
        );
        assert!(
            errors.contains("inputs.colour: the workflow declares no input \"colour\""),
            "{errors}"
        );
    }

    #[test]
    fn whole_doubles_are_ints_and_fractions_are_not() {
        assert!(InputType::Int.accepts(&json!(8.0)));
        assert!(!InputType::Int.accepts(&json!(8.5)));
        assert!(InputType::Number.accepts(&json!(8.5)));
    }
}
