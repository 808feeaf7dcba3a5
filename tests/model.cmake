# The protocol model and the chaos tests' history checker. Included from
# tests/CMakeLists.txt (after eoq_add_test is defined).
#
# model_check runs model/check.sh: spin checks model/eoq.pml (safety with 3
# workers, 2 tasks, max_attempts 3; liveness under weak fairness),
# model/workflows.pml and model/limits.pml, and asserts that every mutant
# yields a counterexample. It needs `spin` (Debian package
# spin) and a C compiler for spin's verifier; without them it is reported as
# skipped, unless EOQ_REQUIRE_ALL is set (see tests/CMakeLists.txt): then
# configuring fails, and the skip fails when the variable is set only for ctest.
find_program(EOQ_SPIN spin)
find_program(EOQ_MODEL_CC NAMES cc gcc clang)
# The model does not depend on how eoq is compiled: check it in the plain build only.
if(EOQ_ASAN OR EOQ_TSAN)
  # nothing: scripts/test all runs the plain build too
elseif(EOQ_SPIN AND EOQ_MODEL_CC)
  add_test(NAME model_check
           COMMAND ${CMAKE_COMMAND} -E env SPIN=${EOQ_SPIN} CC=${EOQ_MODEL_CC}
                   sh ${PROJECT_SOURCE_DIR}/model/check.sh ${CMAKE_CURRENT_BINARY_DIR}/model)
  set_tests_properties(model_check PROPERTIES TIMEOUT 1200 LABELS "model;slow")
elseif(EOQ_REQUIRE_ALL)
  message(FATAL_ERROR "eoq: EOQ_REQUIRE_ALL is set but spin or a C compiler is missing (apt-get install spin): "
                      "model_check would be skipped")
else()
  message(STATUS "eoq: spin or a C compiler not found; model_check will be skipped (apt-get install spin)")
  add_test(NAME model_check COMMAND sh -c "echo 'model_check skipped: spin or a C compiler not found (apt-get install spin)'; \
if [ -n \"\$EOQ_REQUIRE_ALL\" ] && [ \"\$EOQ_REQUIRE_ALL\" != 0 ]; then echo 'EOQ_REQUIRE_ALL is set: a skip is a failure'; exit 1; fi; exit 77")
  set_tests_properties(model_check PROPERTIES SKIP_RETURN_CODE 77 LABELS "model;slow")
endif()

# The history checker (history.hpp) against hand-made good and bad histories
# and a history read back from a real schema.
eoq_add_test(history_test history_test.cpp)
target_link_libraries(history_test PRIVATE eoq_test_history)
