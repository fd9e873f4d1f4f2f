//! Fuzzing by property: whatever the text of an expression and whatever data it reads, compiling
//! and evaluating it returns (an error or a value) without panicking, within the budget.

use std::collections::HashMap;

use dagmesh_spec::{EvalError, Format, compile_text, parse_workflow};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

/// Expression texts built from CEL's pieces, so that most of them parse and reach evaluation.
fn expression() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("inputs.xs".to_owned()),
        Just("inputs.s".to_owned()),
        Just("inputs.n".to_owned()),
        Just("up.items".to_owned()),
        Just("up".to_owned()),
        Just("x".to_owned()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| format!("{n}u")),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        "'[a-zé☃ ]{0,5}'",
        Just("null".to_owned()),
        Just("true".to_owned()),
        Just("b'ab'".to_owned()),
    ];
    leaf.prop_recursive(5, 40, 4, |inner| {
        prop_oneof![
            (
                inner.clone(),
                "[-+*/%]|==|!=|<|<=|>|>=|&&|\\|\\||in",
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (
                inner.clone(),
                "map|filter|all|exists|exists_one",
                inner.clone()
            )
                .prop_map(|(a, m, b)| format!("{a}.{m}(x, {b})")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, b, c)| format!("({a} ? {b} : {c})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a}[{b}]")),
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            (inner.clone(), inner.clone()).prop_map(|(k, v)| format!("{{{k}: {v}}}")),
            inner.clone().prop_map(|a| format!("size({a})")),
            inner.clone().prop_map(|a| format!("string({a})")),
            inner.clone().prop_map(|a| format!("int({a})")),
            inner.clone().prop_map(|a| format!("has({a}.f)")),
            inner.clone().prop_map(|a| format!("-{a}")),
            inner.prop_map(|a| format!("!{a}")),
        ]
    })
}

fn data() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,8}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn object(value: Value) -> Map<String, Value> {
    match value {
        Value::Object(map) => map,
        other => Map::from_iter([("v".to_owned(), other)]),
    }
}

fn check(expression: &str, inputs: Value, up: Value) -> Result<(), TestCaseError> {
    let yaml = format!(
        "name: wf\nsteps:\n  - {{id: up, task: t}}\n  - id: s\n    task: t\n    needs: [up]\n    inputs: {{v: {}}}\n    when: {}\n",
        serde_json::to_string(expression).unwrap(),
        serde_json::to_string(&format!("({expression}) != null")).unwrap(),
    );
    let wf = match compile_text(&yaml, Format::Yaml) {
        Ok(wf) => wf,
        Err(errors) => {
            for error in &errors {
                prop_assert!(error.path.starts_with("steps[1]."), "{}", error);
            }
            return Ok(());
        }
    };
    let inputs = object(inputs);
    let upstream = HashMap::from([("up".to_owned(), up)]);
    match wf.steps[1].evaluate(&inputs, &upstream) {
        Ok(_) => {}
        Err(EvalError::Input { step, input, .. }) => {
            prop_assert_eq!(step, "s");
            prop_assert_eq!(input, "v");
        }
        Err(
            EvalError::When { step, .. }
            | EvalError::ForEach { step, .. }
            | EvalError::CacheKey { step, .. },
        ) => {
            prop_assert_eq!(step, "s")
        }
    }
    Ok(())
}

/// Expressions whose every part is evaluated (no `? :`, `&&`, `||` or comprehensions, which
/// may skip a part): if one part always fails, the whole does.
fn strict_expression() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("inputs.xs".to_owned()),
        Just("inputs.s".to_owned()),
        Just("inputs.n".to_owned()),
        Just("inputs.f".to_owned()),
        Just("inputs.o".to_owned()),
        Just("inputs.b".to_owned()),
        Just("up".to_owned()),
        (-5i64..5).prop_map(|n| n.to_string()),
        (0u64..5).prop_map(|n| format!("{n}u")),
        Just("1.5".to_owned()),
        "'[a-z]{0,3}'",
        Just("null".to_owned()),
        Just("true".to_owned()),
    ];
    leaf.prop_recursive(4, 24, 3, |inner| {
        prop_oneof![
            (inner.clone(), "[-+*/%]|==|!=|<|<=|>|>=|in", inner.clone())
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| format!("{a}[{b}]")),
            prop::collection::vec(inner.clone(), 0..3).prop_map(|v| format!("[{}]", v.join(", "))),
            inner.clone().prop_map(|a| format!("size({a})")),
            inner.clone().prop_map(|a| format!("{a}.f")),
            inner.clone().prop_map(|a| format!("{a}.startsWith('a')")),
            inner.clone().prop_map(|a| format!("-{a}")),
            inner.prop_map(|a| format!("!{a}")),
        ]
    })
}

/// Values of the declared types: xs list, s string, n int, f number, o object, b bool.
fn typed_inputs() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(data(), 0..3),
        ".{0,4}",
        any::<i32>(),
        prop_oneof![any::<i32>().prop_map(|n| json!(n)), any::<f64>().prop_map(|f| json!(f))],
        prop::collection::btree_map("[a-f]", data(), 0..3),
        any::<bool>(),
    )
        .prop_map(|(xs, s, n, f, o, b)| {
            json!({"xs": xs, "s": s, "n": n, "f": f, "o": Value::Object(o.into_iter().collect()), "b": b})
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The type checker refuses only what cannot work: an expression it finds a problem in fails
    /// at run time, whatever values of the declared types it reads.
    #[test]
    fn what_the_type_checker_refuses_always_fails_at_run_time(
        expression in strict_expression(),
        inputs in typed_inputs(),
        up in data(),
    ) {
        use dagmesh_spec::InputType;
        let declared = [
            ("xs", InputType::List),
            ("s", InputType::String),
            ("n", InputType::Int),
            ("f", InputType::Number),
            ("o", InputType::Object),
            ("b", InputType::Bool),
        ];
        let Ok(problems) = dagmesh_spec::expression_type_problems(&expression, &declared) else {
            return Ok(());
        };
        if problems.is_empty() {
            return Ok(());
        }
        // Through the store and back, as a run's inputs are (whole numbers become ints).
        let inputs = Value::Object(dagmesh_proto::json::from_struct(Some(
            &dagmesh_proto::json::to_struct(&inputs),
        )));
        let program = cel::Program::compile(&expression).expect("it parsed");
        let result = dagmesh_spec::evaluate_json(&program, &[("inputs", &inputs), ("up", &up)]);
        prop_assert!(
            result.is_err(),
            "{expression} was refused ({problems:?}) but evaluates to {result:?} with {inputs}"
        );
    }

    #[test]
    fn built_expressions_never_panic_at_compile_or_evaluation(
        expression in expression(),
        inputs in data(),
        up in data(),
    ) {
        check(&expression, json!({"xs": inputs.clone(), "s": "text", "n": 3, "raw": inputs}), up)?;
    }

    #[test]
    fn arbitrary_expression_texts_never_panic(text in "[\\PC]{0,60}", up in data()) {
        check(&text, json!({}), up)?;
    }

    #[test]
    fn arbitrary_yaml_and_json_files_never_panic(text in "[-\\[\\]{}:,&*!|>'\"#\\n a-z0-9]{0,200}") {
        if let Ok(spec) = parse_workflow(&text, Format::Yaml) {
            let _ = dagmesh_spec::compile(&spec);
        }
        let _ = parse_workflow(&text, Format::Json);
    }
}
