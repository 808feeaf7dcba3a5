#pragma once
// Rules shared by every store: input they reject with the same words (the
// conformance suite checks that they do), and the batches retention works in.
#include <eoq/task.hpp>
#include <eoq/task_store.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace eoq::detail {

// Strict RFC 8259 JSON; nesting deeper than 512 is refused.
bool is_json(std::string_view text) noexcept;
// Whether two JSON texts are the same value as jsonb equality sees it: object
// member order, whitespace, escapes and the spelling of a number do not count;
// of a repeated member name the last counts. Not JSON: compared as text.
bool json_equal(std::string_view a, std::string_view b);
// Whether `container` contains `contained` as jsonb's @> says (objects: every
// member of the right one, recursively; arrays: every element of the right one
// in some element of the left one, order and repeats aside; scalars: equal; a
// top-level array contains a scalar it holds). Not JSON: false.
bool json_contains(std::string_view container, std::string_view contained);
// Well-formed UTF-8 as PostgreSQL accepts it (no overlong forms, surrogates or
// code points past U+10FFFF). utf8_sequence: the length of the character at
// byte i, 0 when it is not well formed.
bool is_utf8(std::string_view s) noexcept;
std::size_t utf8_sequence(std::string_view s, std::size_t i) noexcept;

void validate_queue(std::string_view field, std::string_view queue);
void validate_json(std::string_view field, std::string_view text, std::size_t max_bytes);
void validate_new_task(const NewTask& task, std::size_t max_payload_bytes, TimePoint now);
// Every task of a submit; in a batch the field names its index ("tasks[3].payload").
void validate_new_tasks(std::span<const NewTask> tasks, bool is_batch, std::size_t max_payload_bytes);
void validate_claim(const ClaimRequest& request);
void validate_limits(std::string_view queue, const QueueLimits& limits);
void validate_owner(std::string_view owner);
void validate_scope(const Scope& scope);
// throughput(minutes): 1..1440.
void validate_throughput_minutes(int minutes);
void validate_positive(std::string_view field, Millis value);
// TaskStore::snooze and eoq::Snooze: 0 to 365 days (field "delay").
void validate_snooze_delay(Millis delay);
void validate_progress(int percent, std::string_view stage);
void validate_prune(Millis older_than, int batch_size);
// limit 1..1000, count_up_to 0..kMaxCountUpTo, a valid queue name.
inline constexpr std::int64_t kMaxCountUpTo = 1'000'000;
void validate_list(const ListQuery& query);
// At most kMaxBatch tasks in one submit_batch.
inline constexpr std::size_t kMaxBatch = 100000;
void validate_batch_size(std::size_t tasks);
// Each completion names a lease, and its result is JSON within the size limit
// (with one_reads_as_result, a batch of one names the field "result", as
// complete() does: complete_batch).
void validate_completions(std::span<const Completion> completions, std::size_t max_payload_bytes,
                          bool one_reads_as_result = true);
// LeaseTransaction::complete_all: the same, and 1..10,000 of them.
void validate_complete_all(std::span<const Completion> completions, std::size_t max_payload_bytes);

struct Batches {
  std::int64_t total = 0;  // rows handled
  bool more = false;       // stopped at `until` with work left
};
// Runs one_batch(size), which handles at most `size` rows and says how many,
// until a batch comes back short, or `until` passes with work left. Batches
// let claims and completions in between instead of one long lock or statement.
template <class F>
Batches in_batches(int size, F&& one_batch, std::optional<std::chrono::steady_clock::time_point> until = {}) {
  Batches out;
  for (;;) {
    const std::int64_t n = one_batch(size);
    out.total += n;
    if (n < size) return out;
    if (until && std::chrono::steady_clock::now() >= *until) {
      out.more = true;
      return out;
    }
  }
}

TimePoint now() noexcept;

// What differs between a submitted task and the one holding its key: "type",
// "payload", "type and payload", or empty when they are equal.
std::string key_difference(const NewTask& submitted, std::string_view type, std::string_view payload);
// Throws KeyConflict when `submitted` is strict and differs from the task that
// holds its key: the field is "key" alone, "tasks[i].key" in a batch (batch_index).
void check_key_reuse(const NewTask& submitted, std::optional<std::size_t> batch_index, std::string_view type,
                     std::string_view payload, const std::string& holder_name, TaskId holder_id);
// The same keys twice in one batch must agree (strict tasks only); throws
// KeyConflict naming the later one. Before anything is written. Returns
// whether any key appears twice.
bool check_batch_keys(std::span<const NewTask> tasks);

// A uniform draw in [0, 1) from a generator of the calling thread's own: retry
// and backoff jitter, for the stores and the worker alike.
double unit_random();

}  // namespace eoq::detail
