#!/usr/bin/env bash
# The package as a host without CMake sees it: installs this build tree into a scratch
# prefix, moves the prefix (eoq.pc finds its paths from its own place), and builds
# consumer.cpp with the compiler and `pkg-config --cflags --libs eoq` alone.
#   pkg-config.sh BUILD_DIR SCRATCH_DIR CXX PKG_CONFIG
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=$1 work=$2 cxx=$3 pkgconfig=$4
rm -rf "$work"; mkdir -p "$work"
cmake --install "$build" --prefix "$work/installed" >/dev/null
mv "$work/installed" "$work/moved"
pc=$(find "$work/moved" -path '*/pkgconfig/eoq.pc' | head -n 1)
[ -n "$pc" ] || { echo "no pkgconfig/eoq.pc under the install prefix"; exit 1; }
export PKG_CONFIG_PATH=$(dirname "$pc")
flags=$("$pkgconfig" --cflags --libs eoq)
echo "pkg-config --cflags --libs eoq: $flags"
# A shared libeoq is found at run time through the rpath; a static one needs nothing more.
"$cxx" -std=c++20 "$here/consumer.cpp" -o "$work/consumer" $flags \
  -Wl,-rpath,"$("$pkgconfig" --variable=libdir eoq)"
"$work/consumer"
