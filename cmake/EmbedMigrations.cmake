# Embeds every src/postgres/migrations/NNNN_name.sql into a C++ source as raw
# string literals, in file-name order, so the library carries its own schema.
function(eoq_embed_migrations dir out)
  file(GLOB files CONFIGURE_DEPENDS ${dir}/*.sql)
  list(SORT files)
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${files})
  set(body "")
  set(n 0)
  foreach(f ${files})
    get_filename_component(name ${f} NAME_WE)
    file(READ ${f} sql)
    string(APPEND body "  {\"${name}\", R\"eoq_sql(${sql})eoq_sql\"},\n")
    math(EXPR n "${n} + 1")
  endforeach()
  set(text "// Generated from src/postgres/migrations by cmake/EmbedMigrations.cmake. Do not edit.
#include \"postgres/migrations.hpp\"
namespace eoq::detail {
const Migration kMigrations[] = {
${body}};
const std::size_t kMigrationCount = ${n};
}  // namespace eoq::detail
")
  # Write only on change so an unrelated reconfigure does not rebuild.
  if(EXISTS ${out})
    file(READ ${out} old)
  endif()
  if(NOT "${old}" STREQUAL "${text}")
    file(WRITE ${out} "${text}")
  endif()
endfunction()
