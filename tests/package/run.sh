#!/usr/bin/env bash
# Installs eoq into a scratch prefix and builds the consumer both ways.
#   run.sh SOURCE_DIR SCRATCH_DIR
set -euo pipefail
src=$1 work=$2
rm -rf "$work"; mkdir -p "$work"
cmake -S "$src" -B "$work/eoq" -DEOQ_BUILD_TESTS=OFF -DEOQ_BUILD_EXAMPLES=OFF -DEOQ_BUILD_BENCH=OFF \
  -DCMAKE_INSTALL_PREFIX="$work/prefix" >/dev/null
cmake --build "$work/eoq" -j2 >/dev/null
cmake --install "$work/eoq" >/dev/null
cmake -S "$src/tests/package" -B "$work/fp" -DEOQ_PACKAGE_MODE=find_package -DCMAKE_PREFIX_PATH="$work/prefix" >/dev/null
cmake --build "$work/fp" >/dev/null
"$work/fp/consumer"
cmake -S "$src/tests/package" -B "$work/as" -DEOQ_PACKAGE_MODE=add_subdirectory -DEOQ_SOURCE_DIR="$src" >/dev/null
cmake --build "$work/as" -j2 >/dev/null
"$work/as/consumer"
