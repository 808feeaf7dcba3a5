#pragma once
#include <cstddef>
#include <vector>

namespace eoq::detail {
// One numbered schema change. Its SQL names the schema as @schema@.
struct Migration {
  const char* name;  // e.g. "0001_tasks": the number orders them
  const char* sql;
};
extern const Migration kMigrations[];
extern const std::size_t kMigrationCount;

// A migration whose SQL holds this line breaks programs built before it (they
// must not claim against a schema that has it): migrate() records that in the
// migrations table, where older builds read it (docs/upgrading.md).
inline constexpr const char* kBreaksOlderMarker = "-- eoq:breaks-older-workers";

// Tests only: migrations taken as if embedded after kMigrations, by migrate()
// and by the schema check of claim(). Set while no store is in use.
extern std::vector<Migration> test_migrations;
}  // namespace eoq::detail
