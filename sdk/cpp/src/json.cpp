#include "dagmesh/json.hpp"

#include <cmath>
#include <vector>

namespace dagmesh {

namespace {
// 2^53: beyond it not every integer is a double.
constexpr double kMaxExactInteger = 9007199254740992.0;
}  // namespace

google::protobuf::Value json_to_value(const nlohmann::json& json) {
  google::protobuf::Value value;
  switch (json.type()) {
    case nlohmann::json::value_t::null:
    case nlohmann::json::value_t::discarded:
      value.set_null_value(google::protobuf::NULL_VALUE);
      break;
    case nlohmann::json::value_t::boolean:
      value.set_bool_value(json.get<bool>());
      break;
    case nlohmann::json::value_t::number_integer:
      value.set_number_value(static_cast<double>(json.get<std::int64_t>()));
      break;
    case nlohmann::json::value_t::number_unsigned:
      value.set_number_value(static_cast<double>(json.get<std::uint64_t>()));
      break;
    case nlohmann::json::value_t::number_float:
      value.set_number_value(json.get<double>());
      break;
    case nlohmann::json::value_t::string:
      value.set_string_value(json.get_ref<const std::string&>());
      break;
    case nlohmann::json::value_t::binary: {
      // Not JSON proper; carry the bytes as a list of numbers, like nlohmann's own dump.
      auto* list = value.mutable_list_value();
      for (auto byte : json.get_binary()) list->add_values()->set_number_value(byte);
      break;
    }
    case nlohmann::json::value_t::array: {
      auto* list = value.mutable_list_value();
      for (const auto& item : json) *list->add_values() = json_to_value(item);
      break;
    }
    case nlohmann::json::value_t::object: {
      auto* fields = value.mutable_struct_value()->mutable_fields();
      for (const auto& [key, item] : json.items()) (*fields)[key] = json_to_value(item);
      break;
    }
  }
  return value;
}

google::protobuf::Struct json_to_struct(const nlohmann::json& json) {
  google::protobuf::Struct s;
  if (json.is_object()) {
    auto* fields = s.mutable_fields();
    for (const auto& [key, item] : json.items()) (*fields)[key] = json_to_value(item);
  } else if (!json.is_null()) {
    (*s.mutable_fields())["value"] = json_to_value(json);
  }
  return s;
}

nlohmann::json value_to_json(const google::protobuf::Value& v) {
  switch (v.kind_case()) {
    case google::protobuf::Value::kBoolValue:
      return v.bool_value();
    case google::protobuf::Value::kNumberValue: {
      const double n = v.number_value();
      if (!std::isfinite(n)) return nullptr;
      // Whole numbers come back as integers so 3 does not turn into 3.0 on a round trip.
      if (std::trunc(n) == n && std::fabs(n) < kMaxExactInteger) {
        return static_cast<std::int64_t>(n);
      }
      return n;
    }
    case google::protobuf::Value::kStringValue:
      return v.string_value();
    case google::protobuf::Value::kListValue: {
      auto array = nlohmann::json::array();
      for (const auto& item : v.list_value().values()) array.push_back(value_to_json(item));
      return array;
    }
    case google::protobuf::Value::kStructValue:
      return struct_to_json(v.struct_value());
    case google::protobuf::Value::kNullValue:
    case google::protobuf::Value::KIND_NOT_SET:
    default:
      return nullptr;
  }
}

nlohmann::json struct_to_json(const google::protobuf::Struct& s) {
  auto object = nlohmann::json::object();
  for (const auto& [key, value] : s.fields()) object[key] = value_to_json(value);
  return object;
}

std::size_t payload_size(const google::protobuf::Struct& s) { return s.ByteSizeLong(); }

std::optional<std::string> check_payload_size(const std::string& task_type, std::size_t size,
                                              std::uint64_t limit) {
  if (limit == 0 || static_cast<std::uint64_t>(size) <= limit) return std::nullopt;
  return "output of " + nlohmann::json(task_type).dump() + " is " + std::to_string(size) +
         " bytes, over the " + std::to_string(limit) + "-byte payload limit";
}

std::optional<std::string> check_depth(const std::string& field,
                                       const google::protobuf::Struct& payload,
                                       std::size_t limit) {
  // Iterative, so that no depth can overflow the stack here.
  struct Item {
    const google::protobuf::Struct* object;
    const google::protobuf::ListValue* list;
    std::size_t depth;
    std::string path;
  };
  std::vector<Item> stack{{&payload, nullptr, 1, field}};
  while (!stack.empty()) {
    Item item = std::move(stack.back());
    stack.pop_back();
    if (item.depth > limit) {
      return item.path + ": nested deeper than the limit of " + std::to_string(limit) + " levels";
    }
    auto push = [&](const google::protobuf::Value& value, std::string path) {
      if (value.has_struct_value()) {
        stack.push_back({&value.struct_value(), nullptr, item.depth + 1, std::move(path)});
      } else if (value.has_list_value()) {
        stack.push_back({nullptr, &value.list_value(), item.depth + 1, std::move(path)});
      }
    };
    if (item.object != nullptr) {
      for (const auto& [key, value] : item.object->fields()) push(value, item.path + "." + key);
    } else {
      for (int i = 0; i < item.list->values_size(); ++i) {
        push(item.list->values(i), item.path + "[" + std::to_string(i) + "]");
      }
    }
  }
  return std::nullopt;
}

std::optional<std::string> check_outputs(const std::string& task_type,
                                         const google::protobuf::Struct& outputs,
                                         std::uint64_t limit) {
  if (auto error = check_payload_size(task_type, payload_size(outputs), limit)) return error;
  if (auto error = check_depth("outputs", outputs)) {
    return "output of " + nlohmann::json(task_type).dump() + ": " + *error;
  }
  return std::nullopt;
}

std::optional<std::string> check_inputs(const std::string& task_type,
                                        const google::protobuf::Struct& inputs,
                                        std::uint64_t limit) {
  const std::size_t size = payload_size(inputs);
  if (limit != 0 && static_cast<std::uint64_t>(size) > limit) {
    return "inputs of " + nlohmann::json(task_type).dump() + " are " + std::to_string(size) +
           " bytes, over the " + std::to_string(limit) + "-byte payload limit";
  }
  if (auto error = check_depth("inputs", inputs)) {
    return "inputs of " + nlohmann::json(task_type).dump() + ": " + *error;
  }
  return std::nullopt;
}

}  // namespace dagmesh
