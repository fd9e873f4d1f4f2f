//! Property tests: random DAGs, cycles, file round trips and the backoff schedule.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use dagmesh_spec::{
    Format, Retry, RetryPolicy, StepSpec, WorkflowSpec, compile, content_hash, parse_workflow,
    render_workflow,
};
use proptest::prelude::*;
use proptest::sample::Index;

/// A DAG over `n` steps as edges `(upstream, downstream)`, always from a lower to a higher
/// logical index, plus the position of each step in the spec (a permutation), so that the spec
/// order is unrelated to the dependency order.
#[derive(Debug, Clone)]
struct Dag {
    n: usize,
    edges: Vec<(usize, usize)>,
    position: Vec<usize>,
}

fn dag(min: usize) -> impl Strategy<Value = Dag> {
    (min..12usize).prop_flat_map(|n| {
        let pairs: Vec<(usize, usize)> = (0..n).flat_map(|j| (0..j).map(move |i| (i, j))).collect();
        let keep = prop::collection::vec(prop::bool::weighted(0.3), pairs.len());
        let position = Just((0..n).collect::<Vec<_>>()).prop_shuffle();
        (keep, position).prop_map(move |(keep, position)| Dag {
            n,
            edges: pairs
                .iter()
                .zip(keep)
                .filter(|(_, k)| *k)
                .map(|(p, _)| *p)
                .collect(),
            position,
        })
    })
}

impl Dag {
    /// Steps `s0..sN` placed at their positions; each reads the outputs of every step it needs.
    fn spec(&self) -> WorkflowSpec {
        let mut steps = vec![StepSpec::default(); self.n];
        for k in 0..self.n {
            let needs: Vec<usize> = self
                .edges
                .iter()
                .filter(|&&(_, d)| d == k)
                .map(|&(u, _)| u)
                .collect();
            steps[self.position[k]] = StepSpec {
                id: format!("s{k}"),
                task: "work@^1".to_owned(),
                needs: needs.iter().map(|u| format!("s{u}")).collect(),
                inputs: needs
                    .iter()
                    .map(|u| (format!("from_s{u}"), format!("s{u}.out")))
                    .chain([("run".to_owned(), "inputs.x".to_owned())])
                    .collect(),
                ..StepSpec::default()
            };
        }
        WorkflowSpec {
            name: "random".to_owned(),
            steps,
            ..WorkflowSpec::default()
        }
    }

    /// `reach[a][b]`: b is downstream of a.
    fn reachability(&self) -> Vec<Vec<bool>> {
        let mut reach = vec![vec![false; self.n]; self.n];
        // Edges go from lower to higher logical index, so one pass from the top settles it.
        for a in (0..self.n).rev() {
            for &(u, d) in &self.edges {
                if u == a {
                    let below = reach[d].clone();
                    reach[a][d] = true;
                    for (to, &r) in reach[a].iter_mut().zip(&below) {
                        *to |= r;
                    }
                }
            }
        }
        reach
    }
}

fn step_index(spec: &WorkflowSpec, id: &str) -> usize {
    spec.steps.iter().position(|s| s.id == id).unwrap()
}

proptest! {
    #[test]
    fn random_dags_compile_and_topo_order_respects_needs(dag in dag(1)) {
        let spec = dag.spec();
        let wf = compile(&spec).map_err(|e| TestCaseError::fail(e.to_string()))?;

        let mut sorted = wf.topo_order.clone();
        sorted.sort_unstable();
        prop_assert_eq!(sorted, (0..dag.n).collect::<Vec<_>>());
        let mut rank = vec![0; dag.n];
        for (r, &i) in wf.topo_order.iter().enumerate() {
            rank[i] = r;
        }
        for step in &wf.steps {
            for &need in &step.needs {
                prop_assert!(rank[need] < rank[step.index]);
                prop_assert!(wf.steps[need].dependants.contains(&step.index));
            }
        }
    }

    #[test]
    fn a_step_may_read_exactly_its_transitive_upstream_steps(
        dag in dag(2),
        reader in any::<Index>(),
        read in any::<Index>(),
    ) {
        let k = reader.index(dag.n);
        let a = read.index(dag.n);
        let mut spec = dag.spec();
        spec.steps[dag.position[k]]
            .inputs
            .insert("probe".to_owned(), format!("s{a}.out"));
        let upstream = dag.reachability()[a][k];
        match compile(&spec) {
            Ok(_) => prop_assert!(upstream, "s{} read s{} which is not upstream", k, a),
            Err(errors) => {
                prop_assert!(!upstream, "s{} may read s{}: {}", k, a, errors);
                prop_assert_eq!(errors.len(), 1, "{}", errors);
                prop_assert_eq!(
                    &errors.0[0].path,
                    &format!("steps[{}].inputs.probe", dag.position[k])
                );
            }
        }
    }

    #[test]
    fn a_back_edge_is_reported_as_a_cycle_of_real_needs(dag in dag(2), pick in any::<Index>()) {
        let mut dag = dag;
        let mut reach = dag.reachability();
        if !reach.iter().flatten().any(|&r| r) {
            dag.edges.push((0, 1));
            reach = dag.reachability();
        }
        let pairs: Vec<(usize, usize)> = (0..dag.n)
            .flat_map(|a| (0..dag.n).map(move |b| (a, b)))
            .filter(|&(a, b)| reach[a][b])
            .collect();
        let (up, down) = pairs[pick.index(pairs.len())];
        let mut spec = dag.spec();
        // The upstream step now also needs a step downstream of it.
        spec.steps[dag.position[up]].needs.push(format!("s{down}"));

        let errors = compile(&spec).expect_err("a cycle must not compile");
        prop_assert_eq!(errors.len(), 1, "{}", errors);
        let error = &errors.0[0];
        prop_assert_eq!(&error.path, "steps");
        let names: Vec<&str> = error
            .message
            .strip_prefix("cycle between steps ")
            .unwrap()
            .split(" -> ")
            .map(|n| n.trim_matches('"'))
            .collect();
        prop_assert!(names.len() >= 3);
        prop_assert_eq!(names.first(), names.last());
        let distinct: BTreeSet<&str> = names[1..].iter().copied().collect();
        prop_assert_eq!(distinct.len(), names.len() - 1, "a simple cycle: {:?}", names);
        for pair in names.windows(2) {
            let needer = &spec.steps[step_index(&spec, pair[1])];
            prop_assert!(needer.needs.iter().any(|n| n == pair[0]), "{} does not need {}", pair[1], pair[0]);
        }
    }

    #[test]
    fn specs_round_trip_through_yaml_and_json(spec in any_spec()) {
        for format in [Format::Yaml, Format::Json] {
            let text = render_workflow(&spec, format);
            let parsed = parse_workflow(&text, format)
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            prop_assert_eq!(&parsed, &spec, "{}", text);
            prop_assert_eq!(content_hash(&parsed), content_hash(&spec));
        }
    }

    #[test]
    fn the_hash_ignores_map_order_but_not_content(spec in any_spec()) {
        let mut reordered = spec.clone();
        for step in &mut reordered.steps {
            // Fresh maps: another random state, so another iteration order.
            step.inputs = step.inputs.clone().into_iter().collect::<HashMap<_, _>>();
            step.labels = step.labels.clone().into_iter().collect::<HashMap<_, _>>();
        }
        prop_assert_eq!(content_hash(&reordered), content_hash(&spec));
        let mut changed = spec.clone();
        changed.description.push('!');
        prop_assert_ne!(content_hash(&changed), content_hash(&spec));
    }

    #[test]
    fn parsing_and_compiling_never_panic(text in ".{0,200}") {
        if let Ok(spec) = parse_workflow(&text, Format::Yaml) {
            let _ = compile(&spec);
        }
        let _ = parse_workflow(&text, Format::Json);
    }

    #[test]
    fn compiling_any_spec_never_panics_and_errors_have_paths(spec in any_spec()) {
        if let Err(errors) = compile(&spec) {
            for error in &errors {
                let known = ["steps", "on_exit", "on_success", "on_failure", "notifications"];
                prop_assert!(
                    error.path == "name" || known.iter().any(|p| error.path.starts_with(p)),
                    "{}",
                    error
                );
                prop_assert!(!error.message.is_empty());
            }
        }
    }

    #[test]
    fn backoff_grows_stays_capped_and_jitters_within_its_fraction(
        initial_ms in 1u64..10_000,
        max_ms in 10_000u64..1_000_000,
        multiplier in 1.0f64..5.0,
        jitter in 0.0f64..=1.0,
        attempt in 1u32..100,
        r in 0.0f64..1.0,
    ) {
        let retry = Retry {
            max_attempts: 100,
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
            multiplier,
            jitter,
            retry_non_retryable: false,
        };
        let plain = retry.backoff(attempt, 0.0);
        prop_assert!(plain <= retry.max_backoff);
        prop_assert!(retry.backoff(attempt + 1, 0.0) >= plain);
        let jittered = retry.backoff(attempt, r).as_secs_f64();
        prop_assert!(jittered <= plain.as_secs_f64() + 1e-9);
        prop_assert!(jittered >= plain.as_secs_f64() * (1.0 - jitter) - 1e-9);
    }
}

fn any_retry() -> impl Strategy<Value = RetryPolicy> {
    (
        prop_oneof![0u32..10, any::<u32>()],
        prop_oneof![Just(String::new()), "[0-9]{1,3}(ms|s|m)", any_duration()],
        prop_oneof![Just(String::new()), "[0-9]{1,3}(s|m|h)", any_duration()],
        prop_oneof![Just(0.0), 0.5f64..4.0],
        prop_oneof![Just(0.0), -0.5f64..1.5],
        any::<bool>(),
    )
        .prop_map(
            |(
                max_attempts,
                initial_backoff,
                max_backoff,
                multiplier,
                jitter,
                retry_non_retryable,
            )| {
                RetryPolicy {
                    max_attempts,
                    initial_backoff,
                    max_backoff,
                    multiplier,
                    jitter,
                    retry_non_retryable,
                }
            },
        )
}

fn any_step() -> impl Strategy<Value = StepSpec> {
    let text = ".{0,20}";
    let map = (
        prop_oneof![Just(String::new()), "inputs.[a-z]{1,4}", text],
        prop_oneof![Just(0u32), any::<u32>()],
        any::<bool>(),
        prop_oneof![Just(String::new()), any_duration()],
        prop::option::weighted(
            0.2,
            (".{0,20}", any_duration())
                .prop_map(|(message, timeout)| dagmesh_spec::ApprovalSpec { message, timeout }),
        ),
        prop_oneof![Just(String::new()), "[a-z.-]{1,8}(@[0-9]{1,3})?", text],
        prop::option::weighted(
            0.2,
            (prop_oneof![Just(String::new()), text], any_duration())
                .prop_map(|(key, ttl)| dagmesh_proto::v1::CacheSpec { key, ttl }),
        ),
    );
    let base = (
        prop_oneof!["[a-z_][a-z0-9_]{0,6}", text],
        prop_oneof!["[a-z.]{1,8}(@\\^[0-9]\\.[0-9])?", text],
        prop::collection::vec("[a-z_][a-z0-9_]{0,6}", 0..3),
        prop::collection::hash_map("[a-z_]{1,6}", text, 0..4),
        prop_oneof![Just(String::new()), text],
        prop::option::of(any_retry()),
        prop_oneof![Just(String::new()), "[0-9]{1,2}(s|m)", any_duration(), text],
        prop::collection::hash_map("[a-z]{1,6}", text, 0..3),
        any::<u32>(),
        any::<i32>(),
        "[a-z_.-]{0,8}",
        any_duration(),
    );
    (base, map).prop_map(
        |(
            (
                id,
                task,
                needs,
                inputs,
                when,
                retry,
                timeout,
                labels,
                slots,
                priority,
                concurrency_key,
                schedule_to_start_timeout,
            ),
            (for_each, max_parallel, continue_on_failure, sleep, approval, workflow, cache),
        )| StepSpec {
            id,
            task,
            needs,
            inputs,
            when,
            retry,
            timeout,
            labels,
            slots,
            priority,
            concurrency_key,
            schedule_to_start_timeout,
            for_each,
            max_parallel,
            continue_on_failure,
            sleep,
            approval,
            wait_for: None,
            workflow,
            cache,
        },
    )
}

/// Durations from empty and plain to absurd: huge numbers, many parts, fractions, unicode.
fn any_duration() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        "[0-9]{1,3}(ns|ms|s|m|h|d)",
        "[0-9]{15,25}(ns|s|y)",
        "([0-9]{1,12}\\.?[0-9]{0,12}(ns|us|ms|s|m|h|d|w|M|y) ?){1,8}",
        ".{0,20}",
    ]
}

fn any_spec() -> impl Strategy<Value = WorkflowSpec> {
    let notification = (
        prop_oneof![
            Just("https://hooks.example.com/x".to_owned()),
            "http://[a-z]{1,8}(:[0-9]{1,5})?/[a-z=?&]{0,10}",
            ".{0,30}",
        ],
        prop::collection::vec(
            prop_oneof![
                Just("run.failed".to_owned()),
                Just("step.failed".to_owned()),
                ".{0,12}"
            ],
            0..3,
        ),
        prop_oneof![
            Just(String::new()),
            Just("event.run.state == 'FAILED'".to_owned()),
            ".{0,20}"
        ],
    )
        .prop_map(|(url, events, filter)| dagmesh_proto::v1::Notification {
            url,
            events,
            filter,
        });
    (
        (
            prop_oneof!["[A-Za-z0-9_.-]{1,20}", ".{0,20}"],
            ".{0,40}",
            prop::collection::vec(any_step(), 0..5),
            any::<bool>(),
        ),
        prop::collection::vec(any_step(), 0..2),
        prop::collection::vec(any_step(), 0..2),
        prop::collection::vec(notification, 0..2),
    )
        .prop_map(
            |(
                (name, description, steps, continue_on_failure),
                on_exit,
                on_failure,
                notifications,
            )| {
                WorkflowSpec {
                    name,
                    description,
                    steps,
                    continue_on_failure,
                    inputs: Default::default(),
                    on_exit,
                    on_success: Vec::new(),
                    on_failure,
                    notifications,
                }
            },
        )
}
