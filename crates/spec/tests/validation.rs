//! Every rejection, with the exact path and message a user reads.

use dagmesh_spec::{Format, compile_text, parse_workflow};
use std::time::Duration;

/// The errors of a YAML spec, one string per problem.
fn errors(yaml: &str) -> Vec<String> {
    match compile_text(yaml, Format::Yaml) {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

/// A one-step workflow whose step has the given extra YAML lines (indented 4).
fn one_step(extra: &str) -> String {
    format!("name: wf\nsteps:\n  - id: fetch\n    task: fetch\n{extra}")
}

#[test]
fn a_complete_spec_compiles_with_defaults_applied() {
    let yaml = r#"
name: room-scan
description: scan a room
steps:
  - id: fetch
    task: fetch.images@^1.2
    inputs:
      room: inputs.room
      count: 3
      ratio: 0.5
      tags: [a, b]
      opts: {deep: true}
      nothing: null
  - id: mesh
    task: "mesh.build@>=1.0, <3"
    needs: [fetch]
    inputs: { images: fetch.images }
    when: size(fetch.images) > 3
    retry: { max_attempts: 3, initial_backoff: 2s, max_backoff: 1m, multiplier: 3, jitter: 0.5 }
    timeout: 1h 30m
    labels: { gpu: true, mem: 16, zone: eu }
    slots: 2
    priority: -1
  - id: report
    task: report
    needs: [mesh]
    inputs: { images: fetch.images, mesh: mesh.url }
"#;
    let spec = parse_workflow(yaml, Format::Yaml).unwrap();
    assert_eq!(spec.steps[0].inputs["count"], "3");
    assert_eq!(spec.steps[0].inputs["tags"], r#"["a","b"]"#);
    assert_eq!(spec.steps[0].inputs["opts"], r#"{"deep":true}"#);
    assert_eq!(spec.steps[0].inputs["nothing"], "null");
    assert_eq!(spec.steps[1].labels["gpu"], "true");
    assert_eq!(spec.steps[1].labels["mem"], "16");

    let wf = compile_text(yaml, Format::Yaml).unwrap();
    assert_eq!(wf.topo_order, [0, 1, 2]);
    let [fetch, mesh, report] = &wf.steps[..] else {
        panic!("three steps")
    };
    assert_eq!(fetch.task_name, "fetch.images");
    assert!(fetch.version_req.matches(&semver::Version::new(1, 4, 0)));
    assert!(!fetch.version_req.matches(&semver::Version::new(2, 0, 0)));
    assert_eq!(fetch.retry.max_attempts, 1, "no retry policy: one attempt");
    assert_eq!(fetch.slots, 1, "0 slots means 1");
    assert_eq!(fetch.timeout, None);
    assert_eq!(fetch.dependants, [1]);
    assert_eq!(mesh.task_name, "mesh.build");
    assert_eq!(mesh.needs, [0]);
    assert_eq!(mesh.retry.max_attempts, 3);
    assert_eq!(mesh.retry.initial_backoff, Duration::from_secs(2));
    assert_eq!(mesh.retry.max_backoff, Duration::from_secs(60));
    assert_eq!(mesh.retry.multiplier, 3.0);
    assert_eq!(mesh.retry.jitter, 0.5);
    assert_eq!(mesh.timeout, Some(Duration::from_secs(5400)));
    assert_eq!(mesh.slots, 2);
    assert_eq!(mesh.priority, -1);
    assert!(mesh.when.is_some());
    assert_eq!(report.variables, ["fetch", "mesh"]);
    assert_eq!(wf.step("mesh").unwrap().index, 1);
    assert_eq!(
        wf.roots().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        ["fetch"]
    );
}

#[test]
fn a_task_without_version_accepts_any_version() {
    let wf = compile_text(&one_step(""), Format::Yaml).unwrap();
    assert_eq!(wf.steps[0].version_req, semver::VersionReq::STAR);
}

#[test]
fn a_typo_in_a_field_name_is_an_error_naming_it_and_its_place() {
    let err = parse_workflow(
        "name: wf\nsteps:\n  - id: a\n    task: t\n    neds: [b]\n",
        Format::Yaml,
    )
    .unwrap_err();
    assert_eq!(err.len(), 1);
    let message = err.to_string();
    assert!(
        message.starts_with(
            "line 5, column 5: steps[0]: unknown field `neds`, expected one of `id`, `task`, `needs`"
        ),
        "{message}"
    );
}

#[test]
fn json_syntax_errors_say_where() {
    let err = parse_workflow("{\"name\": \"wf\",\n  \"steps\": [}", Format::Json).unwrap_err();
    assert_eq!(err.to_string(), "line 2, column 13: expected value");
    let err = parse_workflow(r#"{"name": "wf", "stepz": []}"#, Format::Json).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("line 1, column 22: unknown field `stepz`"),
        "{err}"
    );
}

#[test]
fn yaml_syntax_errors_say_where() {
    let err = parse_workflow("name: wf\nsteps: [\n", Format::Yaml).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 3, column 1: did not find expected node content, while parsing a flow node"
    );
}

#[test]
fn label_values_must_be_scalars() {
    let err = parse_workflow(
        "name: wf\nsteps:\n  - id: a\n    labels: {gpu: [1]}\n",
        Format::Yaml,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 4, column 19: steps[0].labels.gpu: invalid type: sequence, expected a string, number or bool"
    );
}

#[test]
fn workflow_name_must_be_short_and_plain() {
    assert_eq!(
        errors("steps: [{id: a, task: t}]"),
        ["name: workflow name is empty"]
    );
    assert_eq!(
        errors("name: room scan\nsteps: [{id: a, task: t}]"),
        ["name: invalid workflow name \"room scan\": use 1-128 characters of [A-Za-z0-9_.-]"]
    );
    let long = "x".repeat(129);
    assert_eq!(
        errors(&format!("name: {long}\nsteps: [{{id: a, task: t}}]")).len(),
        1
    );
    assert!(
        compile_text(
            &format!("name: {}\nsteps: [{{id: a, task: t}}]", &long[1..]),
            Format::Yaml
        )
        .is_ok()
    );
}

#[test]
fn a_workflow_needs_steps() {
    assert_eq!(
        errors("name: wf\nsteps: []"),
        ["steps: a workflow needs at least one step"]
    );
}

#[test]
fn step_ids_are_variable_names_and_not_reserved() {
    let err = errors(
        "name: wf\nsteps:\n  - {id: Fetch, task: t}\n  - {id: inputs, task: t}\n  - {id: run, task: t}\n  - {task: t}\n  - {id: 9a, task: t}\n",
    );
    assert_eq!(
        err,
        [
            "steps[0].id: invalid step id \"Fetch\": use [a-z_][a-z0-9_]* (it is a variable name in expressions)",
            "steps[1].id: step id \"inputs\" is reserved",
            "steps[2].id: step id \"run\" is reserved",
            "steps[3].id: step id is empty",
            "steps[4].id: invalid step id \"9a\": use [a-z_][a-z0-9_]* (it is a variable name in expressions)",
        ]
    );
}

#[test]
fn duplicate_ids_point_at_the_first() {
    assert_eq!(
        errors("name: wf\nsteps:\n  - {id: fetch, task: t}\n  - {id: fetch, task: t}\n"),
        ["steps[1].id: duplicate step id \"fetch\" (first at steps[0])"]
    );
}

#[test]
fn needs_must_name_other_existing_steps_once() {
    assert_eq!(
        errors(
            "name: wf\nsteps:\n  - {id: fetch, task: t}\n  - {id: b, task: t, needs: [mesh, b, fetch, fetch]}\n"
        ),
        [
            "steps[1].needs[0]: unknown step \"mesh\"",
            "steps[1].needs[1]: step \"b\" needs itself",
            "steps[1].needs[3]: \"fetch\" is listed twice",
        ]
    );
}

#[test]
fn cycles_are_named_in_running_order() {
    let yaml = "name: wf\nsteps:\n  - {id: a, task: t, needs: [c]}\n  - {id: b, task: t, needs: [a]}\n  - {id: c, task: t, needs: [b]}\n  - {id: d, task: t, needs: [a]}\n";
    assert_eq!(
        errors(yaml),
        ["steps: cycle between steps \"a\" -> \"b\" -> \"c\" -> \"a\""]
    );
}

#[test]
fn every_separate_cycle_is_reported() {
    let yaml = "name: wf\nsteps:\n  - {id: a, task: t, needs: [b]}\n  - {id: b, task: t, needs: [a]}\n  - {id: c, task: t, needs: [d]}\n  - {id: d, task: t, needs: [c]}\n";
    assert_eq!(
        errors(yaml),
        [
            "steps: cycle between steps \"a\" -> \"b\" -> \"a\"",
            "steps: cycle between steps \"c\" -> \"d\" -> \"c\"",
        ]
    );
}

#[test]
fn tasks_are_a_name_and_an_optional_semver_requirement() {
    assert!(
        compile_text(
            &one_step("").replace("task: fetch", "task: \"thumbnail@>=1.0, <3\""),
            Format::Yaml
        )
        .is_ok()
    );
    let cases = [
        (
            "fetch@^x",
            "steps[0].task: invalid version requirement \"^x\": unexpected character 'x' while parsing major version number",
        ),
        (
            "fetch@",
            "steps[0].task: invalid version requirement \"\": unexpected end of input while parsing major version number",
        ),
        (
            "\"@1\"",
            "steps[0].task: invalid task name \"\": use [A-Za-z0-9_.-]+, then optionally @<version requirement>",
        ),
        (
            "a b",
            "steps[0].task: invalid task name \"a b\": use [A-Za-z0-9_.-]+, then optionally @<version requirement>",
        ),
        ("\"\"", "steps[0].task: task is empty"),
    ];
    for (task, expected) in cases {
        let yaml = one_step("").replace("task: fetch", &format!("task: {task}"));
        assert_eq!(errors(&yaml), [expected], "task {task}");
    }
}

#[test]
fn expressions_must_parse() {
    assert_eq!(
        errors(&one_step("    inputs: {images: \"inputs.x +\"}\n")),
        [
            "steps[0].inputs.images: invalid expression: mismatched input '<EOF>' expecting {'[', '{', '(', '.', '-', '!', 'true', 'false', 'null', NUM_FLOAT, NUM_INT, NUM_UINT, STRING, BYTES, IDENTIFIER} at column 11"
        ]
    );
    assert_eq!(
        errors(&one_step("    when: |\n      inputs.x\n        )\n")),
        [
            "steps[0].when: invalid expression: extraneous input ')' expecting <EOF> at line 2, column 3"
        ]
    );
}

#[test]
fn expressions_read_only_inputs_and_upstream_steps() {
    let yaml = r#"
name: wf
steps:
  - id: fetch
    task: t
    inputs: { a: "foo + 1", b: "fetch.x" }
  - id: mesh
    task: t
    inputs: { a: "thumbs.url" }
  - id: thumbs
    task: t
    needs: [fetch]
    when: "mesh.ok"
"#;
    assert_eq!(
        errors(yaml),
        [
            "steps[0].inputs.a: unknown variable \"foo\"",
            "steps[0].inputs.b: references its own step \"fetch\" (only upstream steps can be read)",
            "steps[1].inputs.a: references step \"thumbs\" which is not upstream of \"mesh\" (add it to needs)",
            "steps[2].when: references step \"mesh\" which is not upstream of \"thumbs\" (add it to needs)",
        ]
    );
}

#[test]
fn transitive_upstream_steps_comprehension_variables_and_type_names_are_fine() {
    let yaml = r#"
name: wf
steps:
  - { id: fetch, task: t }
  - { id: mesh, task: t, needs: [fetch] }
  - id: report
    task: t
    needs: [mesh]
    inputs:
      names: "fetch.images.map(i, i + '.jpg')"
      pairs: "fetch.sizes.filter(s, s > 0).exists_one(s, s == 1)"
      typed: "type(inputs.n) == int"
    when: "has(inputs.report) && mesh.ok"
"#;
    let wf = compile_text(yaml, Format::Yaml).unwrap();
    assert_eq!(wf.steps[2].variables, ["fetch", "inputs", "mesh"]);
}

#[test]
fn a_comprehension_variable_does_not_leak_out_of_its_macro() {
    assert_eq!(
        errors(&one_step("    inputs: {a: \"[1].map(i, i) + [i]\"}\n")),
        ["steps[0].inputs.a: unknown variable \"i\""]
    );
}

#[test]
fn durations_must_parse() {
    assert_eq!(
        errors(&one_step(
            "    timeout: 5 parsecs\n    retry: {initial_backoff: x}\n"
        )),
        [
            "steps[0].retry.initial_backoff: invalid duration \"x\": expected number at 0",
            "steps[0].timeout: invalid duration \"5 parsecs\": unknown time unit \"parsecs\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)",
        ]
    );
    assert_eq!(
        errors(&one_step("    timeout: 0s\n")),
        ["steps[0].timeout: must be longer than zero"]
    );
}

#[test]
fn retry_numbers_must_be_in_range() {
    assert_eq!(
        errors(&one_step(
            "    retry: {jitter: 1.5, multiplier: 0.5, initial_backoff: 10m, max_backoff: 1m}\n"
        )),
        [
            "steps[0].retry.max_backoff: max_backoff 1m is less than initial_backoff 10m",
            "steps[0].retry.multiplier: must be a finite number of at least 1, got 0.5",
            "steps[0].retry.jitter: must be between 0 and 1, got 1.5",
        ]
    );
    assert_eq!(
        errors(&one_step("    retry: {jitter: -0.1}\n")),
        ["steps[0].retry.jitter: must be between 0 and 1, got -0.1"]
    );
}

#[test]
fn all_problems_are_reported_at_once_in_spec_order() {
    let yaml = r#"
name: "bad name"
steps:
  - { id: fetch, task: "fetch@^x", inputs: { a: "nope" } }
  - { id: fetch, task: t, needs: [ghost], timeout: soon }
  - { id: a, task: t, needs: [b] }
  - { id: b, task: t, needs: [a] }
"#;
    let err = compile_text(yaml, Format::Yaml).unwrap_err();
    let paths: Vec<&str> = err.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "name",
            "steps[0].task",
            "steps[0].inputs.a",
            "steps[1].id",
            "steps[1].needs[0]",
            "steps[1].timeout",
            "steps",
        ]
    );
    assert_eq!(err.to_string().lines().count(), 7);
}
