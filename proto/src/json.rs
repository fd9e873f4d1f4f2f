//! Conversions between `serde_json::Value` and `google.protobuf.Struct`/`Value`, the payload
//! types of the API. Integers beyond 2^53 lose precision, as in every protobuf JSON mapping.

use prost_types::{ListValue, Struct, Value, value::Kind};
use serde_json::{Map, Number, Value as Json};

/// A JSON object as a `Struct`. Non-object JSON is wrapped as `{"value": ...}`.
pub fn to_struct(json: &Json) -> Struct {
    match json {
        Json::Object(map) => Struct {
            fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
        },
        other => Struct {
            fields: [("value".to_owned(), to_value(other))].into(),
        },
    }
}

pub fn map_to_struct(map: &Map<String, Json>) -> Struct {
    Struct {
        fields: map.iter().map(|(k, v)| (k.clone(), to_value(v))).collect(),
    }
}

pub fn to_value(json: &Json) -> Value {
    let kind = match json {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(*b),
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        Json::String(s) => Kind::StringValue(s.clone()),
        Json::Array(items) => Kind::ListValue(ListValue {
            values: items.iter().map(to_value).collect(),
        }),
        Json::Object(_) => Kind::StructValue(to_struct(json)),
    };
    Value { kind: Some(kind) }
}

/// A `Struct` as a JSON object; `None` (an absent field) is the empty object.
pub fn from_struct(s: Option<&Struct>) -> Map<String, Json> {
    s.map(|s| {
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), from_value(v)))
            .collect()
    })
    .unwrap_or_default()
}

pub fn from_value(v: &Value) -> Json {
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::BoolValue(b)) => Json::Bool(*b),
        // Whole numbers come back as integers so `3` does not turn into `3.0` on a round trip.
        Some(Kind::NumberValue(n)) if n.fract() == 0.0 && n.abs() < 9.007_199_254_740_992e15 => {
            Json::Number(Number::from(*n as i64))
        }
        Some(Kind::NumberValue(n)) => Number::from_f64(*n).map_or(Json::Null, Json::Number),
        Some(Kind::StringValue(s)) => Json::String(s.clone()),
        Some(Kind::ListValue(list)) => Json::Array(list.values.iter().map(from_value).collect()),
        Some(Kind::StructValue(s)) => Json::Object(from_struct(Some(s))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_nested_json() {
        let json = serde_json::json!({
            "room": "kitchen", "count": 3, "ratio": 0.25, "ok": true, "none": null,
            "images": ["a.jpg", "b.jpg"], "meta": {"depth": [1, 2.5]}
        });
        assert_eq!(Json::Object(from_struct(Some(&to_struct(&json)))), json);
    }
}
