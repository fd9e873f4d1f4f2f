//! The documented limits: each refusal names the field, the size and the limit.

use std::collections::HashMap;
use std::time::Duration;

use dagmesh_spec::{CompiledWorkflow, EvalBudget, EvalError, Format, compile_text, parse_workflow};
use serde_json::{Map, Value, json};

fn errors(yaml: &str) -> Vec<String> {
    match compile_text(yaml, Format::Yaml) {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn one_step(extra: &str) -> String {
    format!("name: wf\nsteps:\n  - id: fetch\n    task: fetch\n{extra}")
}

#[test]
fn names_and_texts_over_their_limits_are_refused_with_size_and_limit() {
    let long = "a".repeat(129);
    let value = "v".repeat(257);
    assert_eq!(
        errors(&format!("name: wf\nsteps:\n  - {{id: {long}, task: t}}\n")),
        ["steps[0].id: step id of 129 bytes, over the limit of 128"]
    );
    assert_eq!(
        errors(&one_step("").replace("task: fetch", &format!("task: {long}"))),
        ["steps[0].task: task name of 129 bytes, over the limit of 128"]
    );
    assert_eq!(
        errors(&one_step("").replace("task: fetch", &format!("task: t@{value}"))),
        ["steps[0].task: task of 259 bytes, over the limit of 256"]
    );
    assert_eq!(
        errors(&one_step(&format!("    inputs: {{{long}: 1}}\n"))),
        ["steps[0].inputs: input name of 129 bytes, over the limit of 128"]
    );
    assert_eq!(
        errors(&one_step(&format!(
            "    labels: {{{long}: x, gpu: {value}}}\n"
        ))),
        [
            "steps[0].labels: label key of 129 bytes, over the limit of 128",
            "steps[0].labels.gpu: 257 bytes, over the limit of 256",
        ]
    );
    assert_eq!(
        errors(&one_step(&format!("    concurrency_key: {long}\n"))),
        ["steps[0].concurrency_key: 129 bytes, over the limit of 128"]
    );
    let expression = format!("'{}'", "x".repeat(4096));
    assert_eq!(
        errors(&one_step(&format!("    when: \"{expression}\"\n"))),
        ["steps[0].when: expression of 4098 bytes, over the limit of 4096"]
    );
}

#[test]
fn counts_over_their_limits_are_refused() {
    let inputs: Vec<String> = (0..65).map(|i| format!("i{i}: 1")).collect();
    let labels: Vec<String> = (0..65).map(|i| format!("l{i}: x")).collect();
    assert_eq!(
        errors(&one_step(&format!(
            "    inputs: {{{}}}\n    labels: {{{}}}\n    slots: 10001\n    retry: {{max_attempts: 101}}\n",
            inputs.join(", "),
            labels.join(", ")
        ))),
        [
            "steps[0].inputs: 65 entries, over the limit of 64",
            "steps[0].retry.max_attempts: 101 attempts, over the limit of 100",
            "steps[0].labels: 65 entries, over the limit of 64",
            "steps[0].slots: 10001 slots, over the limit of 10000",
        ]
    );
    let wf = compile_text(
        &one_step("    slots: 10000\n    retry: {max_attempts: 100}\n"),
        Format::Yaml,
    )
    .unwrap();
    assert_eq!(wf.steps[0].slots, 10_000);
    assert_eq!(wf.steps[0].retry.max_attempts, 100);
}

#[test]
fn timeouts_and_backoffs_are_bounded_and_never_overflow() {
    assert_eq!(
        errors(&one_step(
            "    timeout: 31d\n    schedule_to_start_timeout: 0s\n    retry: {initial_backoff: 25h, max_backoff: 2d}\n"
        )),
        [
            "steps[0].retry.initial_backoff: \"25h\" is over the limit of 1day",
            "steps[0].retry.max_backoff: \"2d\" is over the limit of 1day",
            "steps[0].timeout: \"31d\" is over the limit of 30days",
            "steps[0].schedule_to_start_timeout: must be longer than zero",
        ]
    );
    // Sums that humantime 2.4 itself would panic on (exactly u64::MAX seconds plus a carry).
    let overflow = "18446744073709551615s 999999999ns 1ns";
    assert_eq!(
        errors(&one_step(&format!("    timeout: {overflow}\n"))),
        [format!(
            "steps[0].timeout: invalid duration {overflow:?}: a number of 20 digits, over the limit of 12"
        )]
    );
    let many = "999999999999y ".repeat(4);
    let errs = errors(&one_step(&format!(
        "    schedule_to_start_timeout: {many}\n"
    )));
    assert!(errs[0].contains("number is too large"), "{errs:?}");
    assert_eq!(
        errors(&one_step(&format!(
            "    timeout: \"{}\"\n",
            "1s ".repeat(30)
        ))),
        ["steps[0].timeout: duration text of 90 bytes, over the limit of 64"]
    );

    let wf = compile_text(
        &one_step(
            "    timeout: 30d\n    schedule_to_start_timeout: 5m\n    retry: {max_backoff: 1d}\n",
        ),
        Format::Yaml,
    )
    .unwrap();
    assert_eq!(wf.steps[0].timeout, Some(Duration::from_secs(30 * 86400)));
    assert_eq!(
        wf.steps[0].schedule_to_start_timeout,
        Some(Duration::from_secs(300))
    );
    assert_eq!(wf.steps[0].retry.max_backoff, Duration::from_secs(86400));
}

#[test]
fn expressions_over_the_static_limits_are_refused_at_compile_time() {
    let nested = "inputs.xs.map(a, inputs.xs.map(b, inputs.xs.map(c, c)))";
    assert_eq!(
        errors(&one_step(&format!("    inputs: {{x: \"{nested}\"}}\n"))),
        [
            "steps[0].inputs.x: more than 2 comprehensions (map, filter, all, exists, exists_one) nested in one another, over the limit of 2"
        ]
    );
    assert!(
        compile_text(
            &one_step("    inputs: {x: \"inputs.xs.map(a, inputs.xs.filter(b, b > a))\"}\n"),
            Format::Yaml
        )
        .is_ok()
    );
    let chain = vec!["1"; 40].join(" + ");
    let errs = errors(&one_step(&format!("    inputs: {{x: \"{chain}\"}}\n")));
    assert!(
        errs[0].contains("nested more than 32 levels deep"),
        "{errs:?}"
    );
    let wide = format!("[{}]", vec!["[1, 2, 3, 4, 5, 6, 7, 8, 9]"; 110].join(", "));
    let errs = errors(&one_step(&format!("    inputs: {{x: \"{wide}\"}}\n")));
    assert!(
        errs[0].starts_with("steps[0].inputs.x: expression of more than 1000 nodes"),
        "{errs:?}"
    );
}

fn one_input(expression: &str) -> CompiledWorkflow {
    compile_text(
        &format!(
            "name: wf\nsteps:\n  - {{id: fetch, task: t}}\n  - id: use\n    task: t\n    needs: [fetch]\n    inputs: {{x: \"{expression}\"}}\n"
        ),
        Format::Yaml,
    )
    .unwrap()
}

fn upstream(outputs: Value) -> HashMap<String, Value> {
    HashMap::from([("fetch".to_owned(), outputs)])
}

#[test]
fn an_expression_that_would_build_a_huge_list_is_refused_before_it_runs() {
    let xs: Vec<u32> = (0..5000).collect();
    let outputs = upstream(json!({ "xs": xs }));
    for expression in [
        "fetch.xs.map(a, fetch.xs.map(b, [a, b]))",
        "fetch.xs.map(a, fetch.xs)",
        "fetch.xs.map(a, fetch.xs.filter(b, b > a).size() > 0 ? fetch.xs : [])",
    ] {
        let wf = one_input(expression);
        let err = wf.steps[1]
            .evaluate(&Map::new(), &outputs)
            .expect_err(expression);
        let EvalError::Input {
            step,
            input,
            message,
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!((step.as_str(), input.as_str()), ("use", "x"));
        assert!(
            message.starts_with("estimated cost of ")
                && message.ends_with("over the budget of 20000000; refused before evaluating"),
            "{expression}: {err}"
        );
    }
}

#[test]
fn ordinary_expressions_over_large_data_fit_the_budget() {
    let images: Vec<String> = (0..100_000).map(|i| format!("image-{i:06}")).collect();
    let outputs = upstream(json!({ "images": images, "meta": { "w": 3 } }));
    let wf = one_input("fetch.images.map(i, i + '.png')");
    let inputs = wf.steps[1]
        .evaluate(&Map::new(), &outputs)
        .unwrap()
        .unwrap();
    assert_eq!(inputs["x"][99_999], "image-099999.png");

    let wf = one_input("fetch.images");
    let inputs = wf.steps[1].evaluate_inputs(&Map::new(), &outputs).unwrap();
    assert_eq!(inputs["x"].as_array().map(Vec::len), Some(100_000));
}

#[test]
fn the_result_is_cut_off_at_the_payload_limit_and_depth() {
    let outputs = upstream(json!({ "s": "x".repeat(10_000) }));
    let wf = one_input("[fetch.s, fetch.s]");
    let small = EvalBudget {
        max_payload_bytes: 15_000,
        ..EvalBudget::default()
    };
    let err = wf.steps[1]
        .evaluate_with(&Map::new(), &outputs, &small)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "step \"use\": input \"x\": the result is over the 15000-byte payload limit"
    );

    let deep = format!("{}1{}", "[".repeat(20), "]".repeat(20));
    let err = one_input(&deep).steps[1]
        .evaluate(&Map::new(), &outputs)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "step \"use\": input \"x\": the result is nested deeper than the limit of 19 levels"
    );
}

#[test]
fn workflow_files_are_bounded_in_size() {
    let big = format!(
        "name: wf\ndescription: \"{}\"\nsteps: []\n",
        "x".repeat(8 << 20)
    );
    let err = parse_workflow(&big, Format::Yaml).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("file: {} bytes, over the limit of 8388608", big.len())
    );
}

#[test]
fn yaml_alias_bombs_are_refused_before_they_expand() {
    // Nine levels of ten aliases each: 10^9 strings if expanded.
    let mut bomb = String::from(
        "a0: &a0 [\"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\", \"lol\"]\n",
    );
    for level in 1..9 {
        let prev = format!("*a{}", level - 1);
        bomb.push_str(&format!(
            "a{level}: &a{level} [{}]\n",
            [prev.as_str(); 10].join(", ")
        ));
    }
    let yaml = format!(
        "name: wf\nsteps:\n  - id: a\n    task: t\n    inputs:\n      {}      x: *a8\n",
        bomb.replace('\n', "\n      ")
    );
    let err = parse_workflow(&yaml, Format::Yaml).unwrap_err();
    assert!(
        err.to_string().contains("over the limit")
            || err.to_string().contains("repetition limit exceeded"),
        "{err}"
    );

    // A quadratic expansion within serde_yaml_ng's own alias limit: one 100 KB string anchored,
    // repeated 1000 times.
    let yaml = format!(
        "name: wf\nsteps:\n  - id: &s \"{}\"\n    task: t\n    needs: [{}]\n",
        "a".repeat(100_000),
        vec!["*s"; 1000].join(", ")
    );
    let err = parse_workflow(&yaml, Format::Yaml).unwrap_err();
    assert!(
        err.to_string()
            .contains("the file expands to more than 33554432 values and string bytes"),
        "{err}"
    );
}

#[test]
fn deeply_nested_files_are_refused_without_overflowing_the_stack() {
    let deep = format!(
        "name: wf\nsteps:\n  - id: a\n    task: t\n    inputs: {{x: {}1{}}}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let err = parse_workflow(&deep, Format::Yaml).unwrap_err();
    assert_eq!(
        err.to_string(),
        "line 5, column 144: nested deeper than the limit of 128 levels"
    );
    // Block nesting has no brackets; serde_yaml_ng's own limit refuses it.
    let mut block =
        String::from("name: wf\nsteps:\n  - id: a\n    task: t\n    inputs:\n      x:\n");
    for level in 0..200 {
        block.push_str(&format!("{}- \n", "  ".repeat(level + 4)));
    }
    let err = parse_workflow(&block, Format::Yaml).unwrap_err();
    assert!(
        err.to_string().contains("recursion limit exceeded"),
        "{err}"
    );
    let deep_json = format!(
        "{{\"name\": \"wf\", \"steps\": [{{\"id\": \"a\", \"inputs\": {{\"x\": {}1{}}}}}]}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let err = parse_workflow(&deep_json, Format::Json).unwrap_err();
    assert!(
        err.to_string().contains("recursion limit exceeded"),
        "{err}"
    );
}
