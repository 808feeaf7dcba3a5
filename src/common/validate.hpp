#pragma once
// Input rules shared by every store, so both reject the same input with the
// same words (the conformance suite checks that they do).
#include <eoq/task.hpp>

#include <optional>
#include <span>
#include <string>
#include <string_view>

namespace eoq::detail {

// Strict RFC 8259 JSON; nesting deeper than 512 is refused.
bool is_json(std::string_view text) noexcept;
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
void validate_owner(std::string_view owner);
void validate_scope(const Scope& scope);
void validate_positive(std::string_view field, Millis value);
void validate_progress(int percent, std::string_view stage);
void validate_prune(Millis older_than, int batch_size);

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

}  // namespace eoq::detail
