# cmake -DIN=<file> -DOUT=<file.cpp> -DNAME=<identifier> -DHEADER=<include> -P EmbedFile.cmake
#
# Writes <file> into a C++ source as a byte array, so the binary carries it and
# needs nothing on disk at run time. Bytes rather than a raw string literal:
# any content is safe (no delimiter to collide with) and no compiler limit on
# literal length applies.
file(READ "${IN}" hex HEX)
string(LENGTH "${hex}" hex_length)
math(EXPR size "${hex_length} / 2")
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "'\\\\x\\1'," bytes "${hex}")
# Break the one long line every 16 bytes so the generated file stays readable.
string(REPEAT "'[^']*'," 16 sixteen)  # CMake's regex has no {n}
string(REGEX REPLACE "(${sixteen})" "\\1\n" bytes "${bytes}")
set(text "// Generated from ${IN} by cmake/EmbedFile.cmake. Do not edit.
#include \"${HEADER}\"
namespace {
const char bytes[] = {
${bytes}'\\0'};
}  // namespace
std::string_view ${NAME}() noexcept { return {bytes, ${size}}; }
")
if(EXISTS "${OUT}")
  file(READ "${OUT}" old)
endif()
if(NOT "${old}" STREQUAL "${text}")
  file(WRITE "${OUT}" "${text}")
endif()
