#pragma once

// Conversions between nlohmann::json and google.protobuf.Struct / Value, the payload types of
// the dagmesh API, and the payload size check. Numbers are doubles on the wire: integers
// beyond 2^53 lose precision (as in every protobuf JSON mapping), whole numbers come back as
// integers (so 3 stays 3, not 3.0), NaN and infinities become null.

#include <cstdint>
#include <optional>
#include <string>

#include <google/protobuf/struct.pb.h>
#include <nlohmann/json.hpp>

namespace dagmesh {

/// A JSON object as a Struct. Anything else is wrapped as {"value": ...}; null gives {}.
google::protobuf::Struct json_to_struct(const nlohmann::json& json);
google::protobuf::Value json_to_value(const nlohmann::json& json);

/// A Struct as a JSON object (never null: an empty Struct is {}).
nlohmann::json struct_to_json(const google::protobuf::Struct& s);
nlohmann::json value_to_json(const google::protobuf::Value& v);

/// Protobuf-encoded size of a payload, what Welcome.max_payload_bytes limits.
std::size_t payload_size(const google::protobuf::Struct& s);

/// The error for an output of `size` bytes when the limit is `limit` bytes (0: no limit
/// known), or nothing when it fits:
///   output of "mesh.smooth" is 5000123 bytes, over the 4194304-byte payload limit
std::optional<std::string> check_payload_size(const std::string& task_type, std::size_t size,
                                              std::uint64_t limit);

/// Nesting depth of a payload, in JSON levels ({"a": {"b": 1}} has depth 2): the contract's
/// limit (proto/src/limits.rs), well below what protobuf decoders accept.
constexpr std::size_t kMaxPayloadDepth = 20;

/// Nothing when `payload` is nested at most `limit` levels deep, else an error naming where:
///   outputs.a.b[3].c: nested deeper than the limit of 20 levels
std::optional<std::string> check_depth(const std::string& field,
                                       const google::protobuf::Struct& payload,
                                       std::size_t limit = kMaxPayloadDepth);

/// A handler's outputs against the limit (size, as check_payload_size) and the depth limit.
std::optional<std::string> check_outputs(const std::string& task_type,
                                         const google::protobuf::Struct& outputs,
                                         std::uint64_t limit);

/// An Assign's inputs against the limit its executor announced (0: none) and the depth limit:
///   inputs of "mesh.smooth" are 5000123 bytes, over the 4194304-byte payload limit
std::optional<std::string> check_inputs(const std::string& task_type,
                                        const google::protobuf::Struct& inputs,
                                        std::uint64_t limit);

}  // namespace dagmesh
