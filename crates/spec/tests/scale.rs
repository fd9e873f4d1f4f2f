//! Large workflows compile in time and memory linear in steps + needs.

use dagmesh_spec::{CompiledWorkflow, StepSpec, WorkflowSpec, compile};

const N: usize = 10_000;

fn step(id: String, needs: Vec<String>, inputs: Vec<(&str, String)>) -> StepSpec {
    StepSpec {
        id,
        task: "work@^1".to_owned(),
        needs,
        inputs: inputs
            .into_iter()
            .map(|(name, text)| (name.to_owned(), text))
            .collect(),
        ..StepSpec::default()
    }
}

fn workflow(steps: Vec<StepSpec>) -> WorkflowSpec {
    WorkflowSpec {
        name: "big".to_owned(),
        steps,
        ..WorkflowSpec::default()
    }
}

/// `s0 <- s1 <- ... <- s9999`, each step reading the previous one's output (and, with
/// `read_first`, the first step's too, which is upstream of all of them but needed by one).
fn chain(read_first: bool) -> WorkflowSpec {
    workflow(
        (0..N)
            .map(|i| {
                // One expression per step: parsing dominates the time of this test.
                let text = match (i, read_first) {
                    (0, _) => "inputs.x".to_owned(),
                    (_, false) => format!("s{}.out", i - 1),
                    (_, true) => format!("[s{}.out, s0.out]", i - 1),
                };
                let inputs = vec![("prev", text)];
                let needs = if i > 0 {
                    vec![format!("s{}", i - 1)]
                } else {
                    vec![]
                };
                step(format!("s{i}"), needs, inputs)
            })
            .collect(),
    )
}

/// Every step holds only what it declares: its needs, its dependants and the variables its
/// expressions read. A compiled step that held its ancestors (as it once did) holds thousands.
fn assert_nothing_per_step_grows(wf: &CompiledWorkflow) {
    for step in &wf.steps {
        let declared = wf.spec.steps[step.index].needs.len();
        assert_eq!(step.needs.len(), declared, "{}", step.id);
        assert!(
            step.variables.len() <= 3,
            "{}: {:?}",
            step.id,
            step.variables
        );
        assert!(step.inputs.len() <= 3, "{}", step.id);
    }
}

#[test]
fn a_10000_step_chain_compiles_in_order_with_each_step_reading_the_previous() {
    let wf = compile(&chain(false)).unwrap();
    assert_eq!(wf.topo_order, (0..N).collect::<Vec<_>>());
    let last = &wf.steps[N - 1];
    assert_eq!(last.needs, [N - 2]);
    assert_eq!(last.variables, ["s9998"]);
    assert_eq!(wf.steps[0].dependants, [1]);
    assert_eq!(wf.roots().count(), 1);
    assert_nothing_per_step_grows(&wf);
    for step in &wf.steps {
        assert!(step.dependants.len() <= 1);
    }
}

#[test]
fn every_step_of_a_10000_step_chain_may_read_the_first() {
    let wf = compile(&chain(true)).unwrap();
    assert_eq!(wf.steps[N - 1].variables, ["s0", "s9998"]);
    assert_nothing_per_step_grows(&wf);
}

#[test]
fn reading_a_step_downstream_in_a_10000_step_chain_is_refused_at_that_input() {
    let mut spec = chain(false);
    spec.steps[10]
        .inputs
        .insert("later".to_owned(), "s9999.out".to_owned());
    let errors = compile(&spec).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "steps[10].inputs.later: references step \"s9999\" which is not upstream of \"s10\" (add it to needs)"
    );
}

#[test]
fn a_10000_step_fan_in_compiles_with_one_join_needing_all() {
    let mut steps: Vec<StepSpec> = (0..N - 1)
        .map(|i| step(format!("s{i}"), vec![], vec![]))
        .collect();
    steps.push(step(
        "join".to_owned(),
        (0..N - 1).map(|i| format!("s{i}")).collect(),
        vec![("some", "[s0.out, s5000.out, s9998.out]".to_owned())],
    ));
    let wf = compile(&workflow(steps)).unwrap();
    let join = wf.step("join").unwrap();
    assert_eq!(join.needs.len(), N - 1);
    assert_eq!(join.variables, ["s0", "s5000", "s9998"]);
    assert_eq!(wf.roots().count(), N - 1);
    assert_eq!(wf.topo_order.last(), Some(&(N - 1)));
    for root in wf.roots() {
        assert_eq!(root.dependants, [N - 1]);
    }
    assert_nothing_per_step_grows(&wf);
}

#[test]
fn a_cycle_through_a_10000_step_chain_is_named_without_overflowing_the_stack() {
    let mut spec = chain(false);
    spec.steps[0].needs.push(format!("s{}", N - 1));
    // A default test thread has 2 MiB of stack; a recursive search would need more here.
    let errors = compile(&spec).unwrap_err();
    assert_eq!(errors.len(), 1, "{errors}");
    assert!(
        errors.0[0]
            .message
            .starts_with("cycle between steps \"s0\" -> \"s1\" -> \"s2\""),
        "{}",
        &errors.0[0].message[..200]
    );
}

#[test]
fn more_steps_or_needs_than_the_limits_are_refused_with_the_counts() {
    let max = dagmesh_proto::limits::MAX_STEPS;
    let spec = workflow(
        (0..=max)
            .map(|i| step(format!("s{i}"), vec![], vec![]))
            .collect(),
    );
    assert_eq!(
        compile(&spec).unwrap_err().to_string(),
        format!("steps: {} steps, over the limit of {max}", max + 1)
    );

    // 100,001 needs over 2 steps; the names need not exist, counting comes first.
    let spec = workflow(vec![
        step("a".to_owned(), vec!["x".to_owned(); 50_000], vec![]),
        step("b".to_owned(), vec!["y".to_owned(); 50_001], vec![]),
    ]);
    assert_eq!(
        compile(&spec).unwrap_err().to_string(),
        "steps: 100001 needs in all, over the limit of 100000"
    );
}
