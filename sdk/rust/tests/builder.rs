//! The workflow builder gives exactly the spec the equivalent YAML file does.

use dagmesh_sdk::workflow::{Input, Retry, Step, Workflow, WorkflowError};
use dagmesh_spec::{Format, compile, parse_workflow};
use serde_json::json;

const YAML: &str = r#"
name: everything
description: every construct of the workflow reference
continue_on_failure: true
inputs:
  room_id: {type: string, description: the room}
  image_count: {type: int, default: 8}
  tags: {type: list, default: [a, b]}
steps:
  - id: fetch
    task: images.fetch@^1
    inputs: {room: inputs.room_id, count: inputs.image_count, fixed: 3, flag: false}
    retry: {max_attempts: 3, initial_backoff: 1s, max_backoff: 1m, multiplier: 3, jitter: 0.1, retry_non_retryable: true}
    timeout: 5m
    labels: {gpu: "true"}
    slots: 2
    priority: 5
    concurrency_key: warehouse
    schedule_to_start_timeout: 10m
    cache: {key: "inputs.room_id", ttl: 1h}
  - id: features
    task: features.extract@^1
    needs: [fetch]
    for_each: fetch.images
    max_parallel: 4
    continue_on_failure: true
    inputs: {image: item, position: index}
    cache: {ttl: 7d}
  - id: mesh
    workflow: mesh-room@2
    needs: [features]
    when: "size(features) > 0"
    inputs: {keypoints: features}
  - id: review
    approval: {message: Ship the mesh?, timeout: 24h}
    needs: [mesh]
  - id: nap
    sleep: 10m
    needs: [review]
  - id: paid
    wait_for: {topic: payments, filter: "event.room == inputs.room_id", timeout: 1d}
on_exit:
  - id: notify
    task: notify@^1
    inputs: {state: run.state}
on_success:
  - {id: celebrate, task: notify@^1}
on_failure:
  - {id: page, task: pager@^1, inputs: {errors: run.failed_steps}}
"#;

fn built() -> Workflow {
    let mut wf = Workflow::new("everything")
        .description("every construct of the workflow reference")
        .continue_on_failure();
    wf.input("room_id", Input::string().description("the room"))
        .input("image_count", Input::int().default(8))
        .input("tags", Input::list().default(json!(["a", "b"])));
    let fetch = wf.add(
        Step::task("fetch", "images.fetch@^1")
            .input("room", "inputs.room_id")
            .input("count", "inputs.image_count")
            .input_value("fixed", 3)
            .input_value("flag", false)
            .retry(
                Retry::attempts(3)
                    .initial_backoff("1s")
                    .max_backoff("1m")
                    .multiplier(3.0)
                    .jitter(0.1)
                    .retry_non_retryable(),
            )
            .timeout("5m")
            .label("gpu", "true")
            .slots(2)
            .priority(5)
            .concurrency_key("warehouse")
            .schedule_to_start_timeout("10m")
            .cache("1h")
            .cache_key("inputs.room_id"),
    );
    let features = wf.add(
        Step::task("features", "features.extract@^1")
            .needs(&fetch)
            .for_each("fetch.images")
            .max_parallel(4)
            .continue_on_failure()
            .input("image", "item")
            .input("position", "index")
            .cache("7d"),
    );
    let mesh = wf.add(
        Step::workflow("mesh", "mesh-room@2")
            .needs(&features)
            .when("size(features) > 0")
            .input("keypoints", "features"),
    );
    let review = wf.add(
        Step::approval("review", "Ship the mesh?")
            .timeout("24h")
            .needs(&mesh),
    );
    wf.add(Step::sleep("nap", "10m").needs(&review));
    wf.add(
        Step::wait_for("paid", "payments")
            .filter("event.room == inputs.room_id")
            .timeout("1d"),
    );
    wf.on_exit(Step::task("notify", "notify@^1").input("state", "run.state"));
    wf.on_success(Step::task("celebrate", "notify@^1"));
    wf.on_failure(Step::task("page", "pager@^1").input("errors", "run.failed_steps"));
    wf
}

#[test]
fn the_builder_gives_the_spec_the_yaml_gives() {
    let from_yaml = parse_workflow(YAML, Format::Yaml).expect("valid YAML");
    let from_code = built().build().expect("well-formed");
    assert_eq!(from_code, from_yaml);
    // Both are valid workflows, and hash alike (the server dedupes versions by this hash).
    compile(&from_code).expect("compiles");
    assert_eq!(
        dagmesh_spec::content_hash(&from_code),
        dagmesh_spec::content_hash(&from_yaml)
    );
}

#[test]
fn the_builder_refuses_what_it_can_see() {
    let mut wf = Workflow::new("w");
    wf.add(Step::task("a", "t"));
    wf.add(Step::task("a", "t"));
    assert_eq!(
        wf.build().unwrap_err(),
        WorkflowError::DuplicateId("a".into())
    );

    let mut wf = Workflow::new("w");
    wf.add(Step::task("a", "t").needs("nope"));
    assert_eq!(
        wf.build().unwrap_err().to_string(),
        "step \"a\": needs \"nope\", which is not a step of this workflow"
    );

    let mut wf = Workflow::new("w");
    let a = wf.add(Step::task("a", "t"));
    wf.on_exit(Step::task("a", "t"));
    assert!(matches!(wf.build(), Err(WorkflowError::DuplicateId(_))));

    let mut wf = Workflow::new("w");
    wf.add(Step::task("b", "t"));
    wf.on_exit(Step::task("hook", "t").needs(&a));
    assert_eq!(
        wf.build().unwrap_err(),
        WorkflowError::HookWithNeeds("hook".into())
    );
}
