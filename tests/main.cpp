// Catch2's main for every test binary (compiled once, in eoq_test_main).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
