//! Workflow specs: parsing, validation and compilation of DAGs, and the CEL expressions that pass
//! data between steps.
//!
//! # Specs
//!
//! A workflow spec ([`WorkflowSpec`], see `proto/dagmesh/v1/types.proto`) is a named DAG of
//! steps. Each step runs one task type at a version matching a semver requirement
//! (`mesh.build@^1.2`), after the steps it `needs`. Its `inputs` are CEL expressions; an optional
//! `when` condition skips it (and everything downstream) when false. Files are YAML or JSON with
//! the proto's field names:
//!
//! ```yaml
//! name: room-scan
//! steps:
//!   - id: fetch
//!     task: fetch.images@^1
//!     inputs: { room: inputs.room, limit: 20 }
//!   - id: mesh
//!     task: mesh.build@>=1.2, <3
//!     needs: [fetch]
//!     inputs: { images: fetch.images }
//!     when: size(fetch.images) > 3
//!     retry: { max_attempts: 3, initial_backoff: 2s }
//!     labels: { gpu: true }
//! ```
//!
//! [`parse_workflow`] reads a file, [`compile`] validates a spec and turns it into a
//! [`CompiledWorkflow`] (indexes, topological order, compiled expressions, defaults applied),
//! and [`content_hash`] identifies its content. The runtime then evaluates each step's
//! expressions as its upstream steps finish:
//!
//! ```
//! use std::collections::HashMap;
//! use dagmesh_spec::{Format, compile_text};
//! use serde_json::json;
//!
//! let wf = compile_text(
//!     "name: demo\n\
//!      steps:\n\
//!      - { id: fetch, task: fetch }\n\
//!      - { id: thumbs, task: thumbnail@^1, needs: [fetch], inputs: { first: 'fetch.images[0]' } }\n",
//!     Format::Yaml,
//! )?;
//! let thumbs = wf.step("thumbs").unwrap();
//! let fetch_outputs = json!({"images": ["a.jpg"]});
//! let upstream = HashMap::from([("fetch".to_owned(), fetch_outputs)]);
//! let inputs = thumbs.evaluate_inputs(&serde_json::Map::new(), &upstream)?;
//! assert_eq!(inputs["first"], "a.jpg");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Expression variables
//!
//! An expression of step `s` may read `inputs` (the run's inputs) and the id of every step
//! upstream of `s` (its transitive `needs`), bound to that step's outputs: `fetch.images[0]`.
//! Reading any other step is an error at compile time, so a value is never read before it
//! exists. At run time an upstream step without outputs (it was skipped) is bound to null.
//! JSON whole numbers are CEL `int`s and other numbers `double`s; CEL does not mix them in
//! arithmetic, so write `double(inputs.n) * 1.5`.
//!
//! # Errors
//!
//! [`SpecErrors`] lists every problem, one per line, as `path: message`, where the path is the
//! proto field path (or the position in the file for syntax errors):
//!
//! ```text
//! name: invalid workflow name "room scan": use 1-128 characters of [A-Za-z0-9_.-]
//! steps[1].id: duplicate step id "fetch" (first at steps[0])
//! steps[3].needs[0]: unknown step "mesh"
//! steps[2].inputs.images: references step "mesh" which is not upstream of "fetch" (add it to needs)
//! steps: cycle between steps "a" -> "b" -> "c" -> "a"
//! line 7, column 5: steps[0]: unknown field `neds`, expected one of `id`, `task`, ...
//! ```
//!
//! A cycle is named in running order: `"a" -> "b"` means `b` needs `a`. Evaluation failures
//! are [`EvalError`]s: `step "thumbs": input "size": no such key: width`.

mod compile;
mod cost;
mod error;
mod expansion;
mod expr;
mod inputs;
pub mod notify;
mod parse;
mod retry;
mod typecheck;

pub use compile::{
    CompiledStep, CompiledWorkflow, Hook, ItemInputs, MAX_CACHE_TTL, RESERVED_STEP_IDS, StepCache,
    StepKind, compile,
};
pub use error::{EvalError, SpecError, SpecErrors};
pub use expr::{
    EvalBudget, INDEX_VAR, INPUTS_VAR, ITEM_VAR, MAX_EXPRESSION_TREE_DEPTH, RUN_VAR, evaluate_json,
};
pub use inputs::{DeclaredInput, InputType, check_run_inputs, declared_inputs};
pub use parse::{Format, parse_workflow, render_workflow};
pub use retry::{
    DEFAULT_INITIAL_BACKOFF, DEFAULT_JITTER, DEFAULT_MAX_BACKOFF, DEFAULT_MULTIPLIER, Retry,
};

pub use dagmesh_proto::v1::{ApprovalSpec, RetryPolicy, StepSpec, WorkflowSpec};

use sha2::{Digest, Sha256};

use crate::inputs::DeclaredInput as Declared;

/// Parses and compiles a workflow file in one go.
pub fn compile_text(text: &str, format: Format) -> Result<CompiledWorkflow, SpecErrors> {
    compile(&parse_workflow(text, format)?)
}

/// Hex SHA-256 of the canonical encoding of `spec`: equal content always hashes the same,
/// whatever the order of its map fields. Applying a spec whose hash matches an existing version
/// returns that version.
pub fn content_hash(spec: &WorkflowSpec) -> String {
    // Not `encode_to_vec`: prost maps are `HashMap`s, so their encoded order varies.
    let digest = Sha256::digest(parse::canonical_json(spec));
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The type problems of one expression over run inputs declared with these types (what
/// `compile` reports for a step expression, without the path); `Err` when it does not parse.
pub fn expression_type_problems(
    text: &str,
    inputs: &[(&str, InputType)],
) -> Result<Vec<String>, String> {
    let program = expr::compile(text)?;
    let declared: Vec<Declared> = inputs
        .iter()
        .map(|&(name, kind)| Declared {
            name: name.to_owned(),
            kind,
            default: None,
            description: String::new(),
        })
        .collect();
    Ok(typecheck::check(&program, &declared))
}

/// The cache key of a memoized step (`StepSpec.cache`): hex SHA-256 of the task as written and
/// `value` (the `cache.key` value, or the evaluated inputs), as compact JSON with sorted keys.
pub fn cache_key(task: &str, value: &serde_json::Value) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"dagmesh cache key v1\0");
    hasher.update(task.as_bytes());
    hasher.update(b"\0");
    // serde_json's maps are sorted (no `preserve_order`), so equal values give equal text.
    hasher.update(value.to_string().as_bytes());
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// The runtime shares one compiled workflow across tasks as `Arc<CompiledWorkflow>`.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CompiledWorkflow>();
};
