#pragma once

// The dagmesh C++ SDK: workers that run dagmesh task steps.
#include "dagmesh/json.hpp"
#include "dagmesh/task_context.hpp"
#include "dagmesh/task_error.hpp"
#include "dagmesh/worker.hpp"
