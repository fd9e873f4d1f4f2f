# Finds the SDK's dependencies and wraps each in an IMPORTED GLOBAL interface target:
#   dagmesh_deps::grpcpp    gRPC C++ (gRPC::grpc++ from gRPCConfig.cmake, else pkg-config grpc++)
#   dagmesh_deps::protobuf  libprotobuf (FindProtobuf / protobuf-config, else pkg-config protobuf)
#   dagmesh_deps::json      nlohmann-json (nlohmann_jsonConfig.cmake, else the header alone)
#   dagmesh_deps::opentelemetry  opentelemetry-cpp::api, looked for only when
#                           DAGMESH_FIND_OPENTELEMETRY is QUIET or REQUIRED (the SDK's build sets
#                           it from DAGMESH_WITH_OPENTELEMETRY, the installed config to QUIET when
#                           dagmesh::otel was installed); absent when not found
# The same file is used by the SDK's own build and by the installed dagmeshConfig.cmake, so an
# exported dagmesh::sdk always finds the names it links to, however they were found.
include_guard(GLOBAL)

find_package(Threads REQUIRED)

if(NOT TARGET dagmesh_deps::protobuf)
  add_library(dagmesh_deps::protobuf INTERFACE IMPORTED GLOBAL)
  find_package(Protobuf QUIET)
  if(TARGET protobuf::libprotobuf)
    target_link_libraries(dagmesh_deps::protobuf INTERFACE protobuf::libprotobuf)
  elseif(Protobuf_FOUND)
    target_include_directories(dagmesh_deps::protobuf INTERFACE ${Protobuf_INCLUDE_DIRS})
    target_link_libraries(dagmesh_deps::protobuf INTERFACE ${Protobuf_LIBRARIES})
  else()
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(DAGMESH_PROTOBUF REQUIRED IMPORTED_TARGET GLOBAL protobuf)
    target_link_libraries(dagmesh_deps::protobuf INTERFACE PkgConfig::DAGMESH_PROTOBUF)
  endif()
endif()

if(NOT TARGET dagmesh_deps::grpcpp)
  add_library(dagmesh_deps::grpcpp INTERFACE IMPORTED GLOBAL)
  # Debian bookworm ships gRPCConfig.cmake; other distributions (and older Debian) only the
  # pkg-config files.
  find_package(gRPC CONFIG QUIET)
  if(gRPC_FOUND AND TARGET gRPC::grpc++)
    set(DAGMESH_GRPC_FOUND_BY "gRPCConfig.cmake ${gRPC_VERSION}")
    target_link_libraries(dagmesh_deps::grpcpp INTERFACE gRPC::grpc++)
  else()
    find_package(PkgConfig REQUIRED)
    pkg_check_modules(DAGMESH_GRPCPP REQUIRED IMPORTED_TARGET GLOBAL grpc++)
    set(DAGMESH_GRPC_FOUND_BY "pkg-config grpc++ ${DAGMESH_GRPCPP_VERSION}")
    target_link_libraries(dagmesh_deps::grpcpp INTERFACE PkgConfig::DAGMESH_GRPCPP)
  endif()
  target_link_libraries(dagmesh_deps::grpcpp INTERFACE dagmesh_deps::protobuf Threads::Threads)
endif()

if(NOT TARGET dagmesh_deps::json)
  add_library(dagmesh_deps::json INTERFACE IMPORTED GLOBAL)
  find_package(nlohmann_json 3.9 CONFIG QUIET)
  if(TARGET nlohmann_json::nlohmann_json)
    target_link_libraries(dagmesh_deps::json INTERFACE nlohmann_json::nlohmann_json)
  else()
    find_path(DAGMESH_NLOHMANN_JSON_INCLUDE_DIR nlohmann/json.hpp REQUIRED)
    target_include_directories(dagmesh_deps::json INTERFACE ${DAGMESH_NLOHMANN_JSON_INCLUDE_DIR})
  endif()
endif()

if(DEFINED DAGMESH_FIND_OPENTELEMETRY AND NOT TARGET dagmesh_deps::opentelemetry)
  if(DAGMESH_FIND_OPENTELEMETRY STREQUAL "REQUIRED")
    find_package(opentelemetry-cpp CONFIG REQUIRED)
  else()
    find_package(opentelemetry-cpp CONFIG QUIET)
  endif()
  if(TARGET opentelemetry-cpp::api)
    add_library(dagmesh_deps::opentelemetry INTERFACE IMPORTED GLOBAL)
    target_link_libraries(dagmesh_deps::opentelemetry INTERFACE opentelemetry-cpp::api)
  elseif(DAGMESH_FIND_OPENTELEMETRY STREQUAL "REQUIRED")
    message(FATAL_ERROR "opentelemetry-cpp was found without an opentelemetry-cpp::api target")
  endif()
endif()
