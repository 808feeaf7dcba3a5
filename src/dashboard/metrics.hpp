#pragma once
// GET /metrics: the store's queues in the Prometheus text format.
#include <eoq/dashboard.hpp>
#include <eoq/task_store.hpp>

namespace eoq::detail {

HttpResponse metrics_response(TaskStore& store, const Scope& scope);

}  // namespace eoq::detail
