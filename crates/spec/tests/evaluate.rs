//! Evaluating step inputs and conditions against run inputs and upstream outputs.

use std::collections::HashMap;

use dagmesh_spec::{CompiledWorkflow, EvalError, Format, compile_text};
use serde_json::{Map, Value, json};

fn workflow() -> CompiledWorkflow {
    compile_text(
        r#"
name: room-scan
steps:
  - id: fetch
    task: fetch.images@^1
    inputs: { room: inputs.room, limit: 20, ratio: 0.5, flags: [true, null], label: "'scan of ' + inputs.room" }
  - id: thumbs
    task: thumbnail
    needs: [fetch]
    inputs:
      first: fetch.images[0]
      count: size(fetch.images) + 1
      names: "fetch.images.map(i, i + '.png')"
      size: fetch.meta.width
    when: inputs.thumbnails
  - id: report
    task: report
    needs: [thumbs]
    inputs:
      had_thumbs: thumbs != null
      mode: "inputs.mode"
    when: inputs.mode
"#,
        Format::Yaml,
    )
    .unwrap()
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn run_inputs() -> Map<String, Value> {
    object(json!({"room": "kitchen", "thumbnails": true, "mode": "fast"}))
}

#[test]
fn inputs_read_run_inputs_and_literals_keep_their_json_types() {
    let wf = workflow();
    let resolved = wf.steps[0]
        .evaluate_inputs(&run_inputs(), &HashMap::new())
        .unwrap();
    assert_eq!(
        Value::Object(resolved),
        json!({
            "room": "kitchen", "limit": 20, "ratio": 0.5, "flags": [true, null],
            "label": "scan of kitchen"
        })
    );
}

#[test]
fn inputs_read_upstream_outputs() {
    let wf = workflow();
    let upstream = HashMap::from([(
        "fetch".to_owned(),
        json!({"images": ["a", "b"], "meta": {"width": 640}}),
    )]);
    let resolved = wf
        .step("thumbs")
        .unwrap()
        .evaluate_inputs(&run_inputs(), &upstream)
        .unwrap();
    assert_eq!(
        Value::Object(resolved),
        json!({"first": "a", "count": 3, "names": ["a.png", "b.png"], "size": 640})
    );
}

#[test]
fn a_missing_key_names_the_step_and_the_input() {
    let wf = workflow();
    let upstream = HashMap::from([("fetch".to_owned(), json!({"images": ["a"], "meta": {}}))]);
    let err = wf.steps[1]
        .evaluate_inputs(&run_inputs(), &upstream)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "step \"thumbs\": input \"size\": no such key: width"
    );
    assert!(matches!(err, EvalError::Input { ref input, .. } if input == "size"));
}

#[test]
fn an_upstream_step_without_outputs_is_null() {
    let wf = workflow();
    let resolved = wf.steps[2]
        .evaluate_inputs(&run_inputs(), &HashMap::new())
        .unwrap();
    assert_eq!(
        Value::Object(resolved),
        json!({"had_thumbs": false, "mode": "fast"})
    );
}

#[test]
fn when_decides_whether_the_step_runs() {
    let wf = workflow();
    let thumbs = &wf.steps[1];
    assert!(
        thumbs
            .evaluate_when(&run_inputs(), &HashMap::new())
            .unwrap()
    );
    let off = object(json!({"thumbnails": false}));
    assert!(!thumbs.evaluate_when(&off, &HashMap::new()).unwrap());
    assert!(
        wf.steps[0].evaluate_when(&off, &HashMap::new()).unwrap(),
        "no when: runs"
    );
}

#[test]
fn when_must_return_a_bool() {
    let wf = workflow();
    let err = wf.steps[2]
        .evaluate_when(&run_inputs(), &HashMap::new())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "step \"report\": when: returned string \"fast\", expected a bool"
    );
}

#[test]
fn when_errors_name_the_step() {
    let wf = workflow();
    let err = wf.steps[1]
        .evaluate_when(&Map::new(), &HashMap::new())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "step \"thumbs\": when: no such key: thumbnails"
    );
}

#[test]
fn evaluate_skips_when_false_and_resolves_inputs_otherwise() {
    let wf = workflow();
    let upstream = HashMap::from([(
        "fetch".to_owned(),
        json!({"images": ["a"], "meta": {"width": 1}}),
    )]);
    let off = object(json!({"thumbnails": false}));
    assert_eq!(wf.steps[1].evaluate(&off, &upstream).unwrap(), None);
    let inputs = wf.steps[1]
        .evaluate(&run_inputs(), &upstream)
        .unwrap()
        .unwrap();
    assert_eq!(inputs["count"], json!(2));
}
