//! Property tests for payloads: the depth limit keeps every accepted payload decodable inside
//! the records that carry it, and no byte string makes decoding or checking panic.

use dagmesh_proto::json::{from_struct, to_struct};
use dagmesh_proto::limits::{MAX_PAYLOAD_DEPTH, PayloadError, check_depth, check_payload};
use dagmesh_proto::v1::{
    ListRunsResponse, Run, Step, WatchRunResponse, WorkerMessage, watch_run_response,
};
use proptest::prelude::*;
use prost::Message as _;
use serde_json::{Value, json};

/// JSON trees up to ~40 levels deep, mixing objects and lists.
fn json_tree() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        "[a-z]{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(40, 200, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,4}", inner, 0..3)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// JSON levels of a value inside an object field (the object itself is level 1).
fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn accepted_payloads_decode_inside_every_record_that_carries_them(tree in json_tree()) {
        let payload = to_struct(&json!({ "v": tree.clone() }));
        let levels = 1 + depth(&tree);
        match check_depth("outputs", &payload) {
            Ok(()) => {
                prop_assert!(levels <= MAX_PAYLOAD_DEPTH, "{levels} levels passed");
                let step = Step { outputs: Some(payload.clone()), inputs: Some(payload.clone()), ..Step::default() };
                let run = Run { inputs: Some(payload.clone()), steps: vec![step], ..Run::default() };
                let page = ListRunsResponse { runs: vec![run.clone()], ..ListRunsResponse::default() };
                prop_assert!(ListRunsResponse::decode(page.encode_to_vec().as_slice()).is_ok());
                let watch = WatchRunResponse { message: Some(watch_run_response::Message::Snapshot(run)) };
                prop_assert!(WatchRunResponse::decode(watch.encode_to_vec().as_slice()).is_ok());
                prop_assert_eq!(from_struct(Some(&payload))["v"].clone(), normalised(&tree));
            }
            Err(PayloadError::TooDeep { path, limit }) => {
                prop_assert!(levels > MAX_PAYLOAD_DEPTH, "{levels} levels refused");
                prop_assert_eq!(limit, MAX_PAYLOAD_DEPTH);
                prop_assert!(path.starts_with("outputs.v"), "{}", path);
            }
            Err(other) => prop_assert!(false, "unexpected {other}"),
        }
    }

    #[test]
    fn the_size_limit_is_exact(text in "[a-z]{0,300}", limit in 0usize..400) {
        let payload = to_struct(&json!({ "s": text }));
        let size = payload.encoded_len();
        let checked = check_payload("inputs", &payload, limit);
        prop_assert_eq!(checked.is_ok(), size <= limit);
        if let Err(error) = checked {
            prop_assert!(error.to_string().contains(&format!("{size} bytes")), "{error}");
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoders(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(message) = WorkerMessage::decode(bytes.as_slice()) {
            let _ = message.encode_to_vec();
        }
        if let Ok(payload) = prost_types::Struct::decode(bytes.as_slice()) {
            let _ = check_payload("p", &payload, 1 << 20);
            let _ = from_struct(Some(&payload));
        }
    }
}

/// What a JSON value looks like after a round trip through `Struct` (numbers are doubles).
fn normalised(value: &Value) -> Value {
    dagmesh_proto::json::from_value(&dagmesh_proto::json::to_value(value))
}
