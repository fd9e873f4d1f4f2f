//! Map steps (`for_each`) and typed run inputs: parsing, validation and evaluation.

use std::collections::HashMap;

use dagmesh_spec::{EvalBudget, Format, compile_text, parse_workflow, render_workflow};
use serde_json::{Map, Value, json};

const MAP: &str = r#"
name: scan
inputs:
  room_id: {type: string, description: the room}
  image_count: {type: int, default: 8}
steps:
  - id: fetch
    task: images.fetch
    inputs: {room: inputs.room_id, count: inputs.image_count}
  - id: extract
    task: features.extract@^1
    needs: [fetch]
    for_each: fetch.images
    max_parallel: 4
    continue_on_failure: true
    inputs: {image: item, position: index, room: inputs.room_id}
  - id: merge
    task: features.merge
    needs: [extract]
    inputs: {scores: "extract.map(e, e.score)"}
"#;

fn object(value: Value) -> Map<String, Value> {
    value.as_object().expect("an object").clone()
}

#[test]
fn a_map_step_round_trips_through_yaml() {
    let spec = parse_workflow(MAP, Format::Yaml).unwrap();
    assert_eq!(spec.steps[1].for_each, "fetch.images");
    assert_eq!(spec.steps[1].max_parallel, 4);
    assert!(spec.steps[1].continue_on_failure);
    assert_eq!(spec.inputs["image_count"].r#type, "int");
    let again = parse_workflow(&render_workflow(&spec, Format::Yaml), Format::Yaml).unwrap();
    assert_eq!(again, spec);
    let json = parse_workflow(&render_workflow(&spec, Format::Json), Format::Json).unwrap();
    assert_eq!(json, spec);
}

#[test]
fn items_see_item_and_index_and_dependants_see_a_list() {
    let wf = compile_text(MAP, Format::Yaml).unwrap();
    let extract = wf.step("extract").unwrap();
    assert!(extract.for_each.is_some());
    assert_eq!(extract.max_parallel, 4);
    let run_inputs = wf
        .check_run_inputs(object(json!({"room_id": "r1"})), "inputs")
        .unwrap();
    assert_eq!(run_inputs["image_count"], json!(8));
    let upstream = HashMap::from([("fetch".to_owned(), json!({"images": ["a.jpg", "b.jpg"]}))]);
    let budget = EvalBudget::default();
    let items = extract
        .evaluate_for_each_with(&run_inputs, &upstream, &budget)
        .unwrap();
    assert_eq!(items, vec![json!("a.jpg"), json!("b.jpg")]);
    let mut evaluator = extract.item_inputs(&run_inputs, &upstream, &budget);
    let second = evaluator.evaluate(&items[1], 1).unwrap();
    assert_eq!(
        Value::Object(second),
        json!({"image": "b.jpg", "position": 1, "room": "r1"})
    );

    let merge = wf.step("merge").unwrap();
    let upstream = HashMap::from([("extract".to_owned(), json!([{"score": 1}, {"score": 2}]))]);
    let inputs = merge.evaluate_inputs(&run_inputs, &upstream).unwrap();
    assert_eq!(Value::Object(inputs), json!({"scores": [1, 2]}));
}

#[test]
fn for_each_must_return_a_bounded_list() {
    let wf = compile_text(MAP, Format::Yaml).unwrap();
    let extract = wf.step("extract").unwrap();
    let inputs = object(json!({"room_id": "r", "image_count": 1}));
    let budget = EvalBudget::default();
    let not_a_list = HashMap::from([("fetch".to_owned(), json!({"images": "a.jpg"}))]);
    let error = extract
        .evaluate_for_each_with(&inputs, &not_a_list, &budget)
        .unwrap_err();
    assert_eq!(
        error.to_string(),
        "step \"extract\": for_each: returned string \"a.jpg\", expected a list"
    );
    let huge: Vec<u32> = (0..10_001).collect();
    let too_many = HashMap::from([("fetch".to_owned(), json!({"images": huge}))]);
    let error = extract
        .evaluate_for_each_with(&inputs, &too_many, &budget)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("a list of 10001 items, over the limit of 10000 items per step"),
        "{error}"
    );
}

#[test]
fn map_fields_are_checked_with_their_paths() {
    let text = r#"
name: wf
steps:
  - {id: a, task: t, max_parallel: 2, continue_on_failure: true}
  - {id: b, task: t, inputs: {x: item}}
  - {id: c, task: t, needs: [a], for_each: "[1, 2]", max_parallel: 20000}
  - {id: d, task: t, needs: [a], for_each: "item"}
  - {id: e, task: t, for_each: "nope.x"}
  - {id: list, task: t}
"#;
    let errors = compile_text(text, Format::Yaml).unwrap_err().to_string();
    for expected in [
        "steps[0].max_parallel: only a map step (with for_each) has max_parallel",
        "steps[0].continue_on_failure: only a map step (with for_each) has continue_on_failure",
        "steps[1].inputs.x: unknown variable \"item\" (`item` and `index` exist only in the inputs of a step with for_each)",
        "steps[2].max_parallel: 20000 is over the limit of 10000",
        "steps[3].for_each: unknown variable \"item\"",
        "steps[4].for_each: unknown variable \"nope\"",
        "steps[5].id: step id \"list\" is the name of a CEL type, so expressions could not read it",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
}

#[test]
fn declared_inputs_are_checked_and_expressions_may_only_read_them() {
    let text = r#"
name: wf
inputs:
  count: {type: int, default: "eight"}
  "bad name": {type: string}
  kind: {type: colour}
  room: {type: string}
steps:
  - {id: a, task: t, inputs: {x: inputs.room, y: inputs.rooom}}
"#;
    let errors = compile_text(text, Format::Yaml).unwrap_err().to_string();
    for expected in [
        "inputs.count.default: the string \"eight\" is not of type int",
        "inputs.bad name: invalid input name \"bad name\"",
        "inputs.kind.type: unknown type \"colour\": use one of string, int, number, bool, list, object, any",
        "steps[0].inputs.y: reads inputs.rooom which the workflow does not declare",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    assert!(!errors.contains("steps[0].inputs.x"), "{errors}");
}

#[test]
fn run_inputs_are_refused_with_field_paths() {
    let wf = compile_text(MAP, Format::Yaml).unwrap();
    let errors = wf
        .check_run_inputs(object(json!({"image_count": 2.5, "extra": 1})), "inputs")
        .unwrap_err()
        .to_string();
    assert_eq!(
        errors,
        "inputs.image_count: the number 2.5 is not of type int\n\
         inputs.room_id: required input of type string is missing\n\
         inputs.extra: the workflow declares no input \"extra\" (it takes image_count, room_id)"
    );
}

#[test]
fn a_workflow_without_declared_inputs_takes_anything() {
    let wf = compile_text(
        "name: wf\nsteps: [{id: a, task: t, inputs: {x: inputs.y}}]\n",
        Format::Yaml,
    )
    .unwrap();
    let given = object(json!({"anything": [1]}));
    assert_eq!(wf.check_run_inputs(given.clone(), "inputs").unwrap(), given);
}

#[test]
fn sleeps_and_approvals_are_steps_without_a_task() {
    let text = r#"
name: waits
steps:
  - {id: nap, sleep: 10m}
  - {id: review, needs: [nap], approval: {message: "Ship it?", timeout: 24h}}
  - {id: ship, task: deploy@^1, needs: [review], inputs: {by: review.approved_by}}
"#;
    let spec = parse_workflow(text, Format::Yaml).unwrap();
    let again = parse_workflow(&render_workflow(&spec, Format::Yaml), Format::Yaml).unwrap();
    assert_eq!(again, spec);
    let wf = dagmesh_spec::compile(&spec).unwrap();
    assert_eq!(
        wf.step("nap").unwrap().kind,
        dagmesh_spec::StepKind::Sleep(std::time::Duration::from_secs(600))
    );
    assert_eq!(
        wf.step("review").unwrap().kind,
        dagmesh_spec::StepKind::Approval {
            message: "Ship it?".into(),
            timeout: Some(std::time::Duration::from_secs(24 * 3600)),
        }
    );
    assert_eq!(wf.step("ship").unwrap().kind, dagmesh_spec::StepKind::Task);
}

#[test]
fn a_step_is_exactly_one_kind_and_waits_take_no_task_fields() {
    let text = r#"
name: wf
steps:
  - {id: a, task: t, sleep: 1s}
  - {id: b}
  - {id: c, sleep: 0s}
  - {id: d, sleep: 31d}
  - {id: e, approval: {timeout: soon}}
  - {id: f, sleep: 1m, retry: {max_attempts: 2}, labels: {gpu: "true"}, for_each: "[1]"}
"#;
    let errors = compile_text(text, Format::Yaml).unwrap_err().to_string();
    for expected in [
        "steps[0]: has task and sleep; a step is exactly one of task, workflow, sleep, approval and wait_for",
        "steps[1].task: task is empty",
        "steps[2].sleep: must be longer than zero",
        "steps[3].sleep: \"31d\" is over the limit of 30days",
        "steps[4].approval.timeout: invalid duration \"soon\"",
        "steps[5].retry: a sleep step has no retry: it runs no task",
        "steps[5].labels: a sleep step has no labels: it runs no task",
        "steps[5].for_each: a sleep step has no for_each: it runs no task",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
}

#[test]
fn exit_hooks_read_any_step_and_run_but_need_nothing() {
    let text = r#"
name: hooks
steps:
  - {id: a, task: t}
  - {id: b, task: t, needs: [a], inputs: {x: run.state}}
on_exit:
  - {id: tidy, task: t, inputs: {a: a, state: run.state, failed: run.failed_steps}}
on_failure:
  - {id: page, task: t, needs: [a]}
  - {id: a, task: t}
  - {id: peek, task: t, inputs: {x: tidy}}
"#;
    let errors = compile_text(text, Format::Yaml).unwrap_err().to_string();
    for expected in [
        "steps[1].inputs.x: unknown variable \"run\"",
        "on_failure[0].needs: an exit hook runs after the whole DAG and needs nothing",
        "on_failure[1].id: duplicate step id \"a\" (first at steps[0])",
        "on_failure[2].inputs.x: references step \"tidy\" which is not upstream",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    assert!(!errors.contains("on_exit[0]"), "{errors}");

    let ok = r#"
name: hooks
steps: [{id: a, task: t}]
on_success: [{id: yay, task: t, inputs: {a: a.x}}]
"#;
    let spec = parse_workflow(ok, Format::Yaml).unwrap();
    let again = parse_workflow(&render_workflow(&spec, Format::Yaml), Format::Yaml).unwrap();
    assert_eq!(again, spec);
    let wf = dagmesh_spec::compile(&spec).unwrap();
    assert_eq!(wf.steps.len(), 2);
    assert_eq!(wf.steps[1].hook, Some(dagmesh_spec::Hook::Success));
}

#[test]
fn wait_for_needs_a_topic_and_its_filter_may_read_event() {
    let text = r#"
name: wf
steps:
  - {id: a, wait_for: {topic: uploads, filter: "event.size > 0 && inputs.x == 1", timeout: 1h}}
  - {id: b, wait_for: {topic: ""}}
  - {id: c, wait_for: {topic: t, filter: "evnt.size > 0"}}
  - {id: d, task: t, inputs: {x: event}}
"#;
    let errors = compile_text(text, Format::Yaml).unwrap_err().to_string();
    for expected in [
        "steps[1].wait_for.topic: topic is empty",
        "steps[2].wait_for.filter: unknown variable \"evnt\"",
        "steps[3].inputs.x: unknown variable \"event\"",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    assert!(!errors.contains("steps[0]"), "{errors}");
}

#[test]
fn child_workflow_steps_name_a_workflow_and_may_map() {
    let text = r#"
name: wf
steps:
  - {id: a, workflow: scan-room, inputs: {room: "'r1'"}}
  - {id: b, workflow: "scan-room@3", for_each: "[1, 2]", max_parallel: 1, inputs: {n: item}}
  - {id: c, workflow: "scan room"}
  - {id: d, workflow: "scan@^1"}
  - {id: e, workflow: "scan@0"}
  - {id: f, workflow: scan, task: t}
  - {id: g, workflow: scan, retry: {max_attempts: 2}, labels: {gpu: "true"}}
"#;
    let errors = compile_text(text, Format::Yaml).unwrap_err().to_string();
    for expected in [
        "steps[2].workflow: invalid workflow name \"scan room\"",
        "steps[3].workflow: invalid workflow version \"^1\": a version number (1, 2, ...) is expected",
        "steps[4].workflow: invalid workflow version \"0\"",
        "steps[5]: has task and workflow; a step is exactly one of",
        "steps[6].retry: a child workflow step has no retry: it runs no task",
        "steps[6].labels: a child workflow step has no labels: it runs no task",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    for path in ["steps[0]", "steps[1]"] {
        assert!(!errors.contains(path), "{path} is valid:\n{errors}");
    }
    let good = r#"
name: wf
steps:
  - {id: a, workflow: scan-room, inputs: {room: "'r1'"}}
  - {id: b, workflow: "scan-room@3", for_each: "[1, 2]", inputs: {n: item}}
"#;
    let wf = compile_text(good, Format::Yaml).unwrap();
    assert_eq!(
        wf.step("b").unwrap().kind,
        dagmesh_spec::StepKind::Child {
            workflow: "scan-room".into(),
            version: Some(3)
        }
    );
    let spec = parse_workflow(good, Format::Yaml).unwrap();
    let again = parse_workflow(&render_workflow(&spec, Format::Yaml), Format::Yaml).unwrap();
    assert_eq!(again, spec);
}

#[test]
fn a_cache_needs_a_ttl_and_its_key_is_an_expression() {
    let text = r#"
name: wf
steps:
  - {id: a, task: t, cache: {ttl: 1h}}
  - {id: b, task: t, for_each: "[1]", cache: {key: "[item, inputs.x]", ttl: 7d}}
  - {id: c, task: t, cache: {key: "nope.x"}}
  - {id: d, task: t, cache: {ttl: 400d}}
  - {id: e, sleep: 1s, cache: {ttl: 1h}}
  - {id: f, task: t, cache: {key: "item", ttl: 1h}}
"#;
    let errors = compile_text(text, Format::Yaml).unwrap_err().to_string();
    for expected in [
        "steps[2].cache.ttl: required",
        "steps[2].cache.key:",
        "steps[3].cache.ttl: \"400d\" is over the limit of 366 days",
        "steps[4].cache: a sleep step has no cache: it runs no task",
        "steps[5].cache.key:",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    assert!(
        !errors.contains("steps[0]") && !errors.contains("steps[1]"),
        "{errors}"
    );
    let wf = compile_text(
        "name: wf\nsteps:\n  - {id: b, task: t, for_each: \"[1, 2]\", cache: {key: \"[item, inputs.x]\", ttl: 7d}}\n",
        Format::Yaml,
    )
    .unwrap();
    let step = wf.step("b").unwrap();
    let inputs = object(json!({"x": 5}));
    let key = step
        .evaluate_cache_key_with(
            &inputs,
            &HashMap::new(),
            Some((&json!(2), 1)),
            &EvalBudget::default(),
        )
        .unwrap();
    assert_eq!(key, Some(json!([2, 5])));
    // Equal values give equal keys whatever the key order; the task is part of the key.
    let (one, two) = (json!({"a": 1, "b": 2}), json!({"b": 2, "a": 1}));
    assert_eq!(
        dagmesh_spec::cache_key("t", &one),
        dagmesh_spec::cache_key("t", &two)
    );
    assert_ne!(
        dagmesh_spec::cache_key("t", &one),
        dagmesh_spec::cache_key("u", &one)
    );
}

#[test]
fn expressions_are_type_checked_against_the_declared_inputs() {
    let text = r#"
name: wf
inputs:
  room_id: {type: string}
  image_count: {type: int, default: 8}
  ratio: {type: number, default: 0.5}
  anything: {type: any, default: 1}
steps:
  - id: a
    task: t
    inputs:
      next: inputs.image_count + 1
      label: "'room ' + inputs.room_id"
      scaled: inputs.ratio * 2
      free: inputs.anything + 1
      bad_add: inputs.room_id + 1
      bad_size: size(inputs.image_count)
      bad_field: inputs.room_id.floor
      bad_mix: inputs.image_count * 1.5
  - id: b
    task: t
    when: inputs.room_id
    for_each: inputs.image_count
    inputs: {x: item}
"#;
    let errors = compile_text(text, Format::Yaml).unwrap_err().to_string();
    for expected in [
        "steps[0].inputs.bad_add: `+` cannot add inputs.room_id (a string) and an int",
        "steps[0].inputs.bad_size: size() takes a string, a list or an object, not inputs.image_count (an int)",
        "steps[0].inputs.bad_field: inputs.room_id (a string) has no field \"floor\"",
        "steps[0].inputs.bad_mix: `*` cannot combine inputs.image_count (an int) and a double (CEL does not mix ints and doubles",
        "steps[1].when: returns a string, not a bool",
        "steps[1].for_each: returns an int, not a list",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }
    for fine in [
        "inputs.next",
        "inputs.label",
        "inputs.scaled",
        "inputs.free",
    ] {
        assert!(!errors.contains(fine), "{fine} is fine:\n{errors}");
    }
}
