#pragma once
// The JSON shape of eoq's values, shared by the HTTP API and `eoq --json`, so a
// script sees the same fields from both.
#include <eoq/task_store.hpp>

#include <nlohmann/json.hpp>

#include <string>
#include <string_view>

namespace eoq::json {

// RFC 3339 in UTC with microseconds: 2026-11-23T10:00:00.000000Z.
std::string format_time(TimePoint t);
// RFC 3339 with 'Z' or a numeric offset, fractional seconds optional. Throws
// InvalidArgument(field, ...) for anything else.
TimePoint parse_time(std::string_view field, std::string_view text);

nlohmann::json to_json(const Task& task);
nlohmann::json to_json(const Attempt& attempt);
// {"parents": [...], "children": [...]}, each {id, type, status, result}.
nlohmann::json to_json(const Relatives& relatives);
nlohmann::json to_json(const QueueStats& stats);
nlohmann::json to_json(const TaskPage& page);
// {"concurrency": N|null, "partition_concurrency": N|null, "rate": {"limit": N,
// "period_ms": MS}|null, "partition_rate": ...}; a missing field is null (off).
nlohmann::json to_json(const QueueLimits& limits);
QueueLimits limits_from_json(const nlohmann::json& body);

// A submit request body. Fields: queue, type (required), payload (any JSON
// value), key, tenant, partition, priority, run_at, deadline, timeout_ms, retry {max_attempts,
// backoff, initial_delay_ms, max_delay_ms, jitter}. Unknown fields and wrong
// types throw InvalidArgument naming the field; the store validates the rest.
NewTask new_task_from_json(const nlohmann::json& body);

}  // namespace eoq::json
