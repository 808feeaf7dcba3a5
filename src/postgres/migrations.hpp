#pragma once
#include <cstddef>

namespace eoq::detail {
// One numbered schema change. Its SQL names the schema as @schema@.
struct Migration {
  const char* name;  // e.g. "0001_tasks": the number orders them
  const char* sql;
};
extern const Migration kMigrations[];
extern const std::size_t kMigrationCount;
}  // namespace eoq::detail
