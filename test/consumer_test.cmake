# Installs emt into a scratch prefix, builds every example (examples/) against it with find_package(emt), runs
# each.
set(PREFIX ${BIN}/consumer-prefix)
set(CBUILD ${BIN}/consumer-build)
file(REMOVE_RECURSE ${PREFIX} ${CBUILD})
execute_process(COMMAND ${CMAKE_COMMAND} --install ${BIN} --prefix ${PREFIX} RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "cmake --install failed (${rc})")
endif()
# Relocatable: the exported target names LibTorch by target (found again by the consumer), never by the path
# of this machine's libraries.
file(GLOB _targets ${PREFIX}/lib*/cmake/emt/emtTargets.cmake)
file(READ "${_targets}" _exported)
if(_exported MATCHES "lib(torch|c10)[a-z_]*\\.so")
  message(FATAL_ERROR "the installed emtTargets.cmake names LibTorch library paths: ${CMAKE_MATCH_0}")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} -S ${SRC}/examples -B ${CBUILD} -DCMAKE_PREFIX_PATH=${PREFIX}
  -DCMAKE_BUILD_TYPE=Release RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "configuring the examples against the installed package failed (${rc})")
endif()
execute_process(COMMAND ${CMAKE_COMMAND} --build ${CBUILD} -j2 RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "building the examples failed (${rc})")
endif()
# Each example asserts its own outputs and prints "<name> ok" last.
foreach(example consumer custom_dataset custom_objective custom_scorer)
  string(TIMESTAMP t0 "%s")
  execute_process(COMMAND ${CBUILD}/${example} ${CBUILD}/work-${example} RESULT_VARIABLE rc OUTPUT_VARIABLE out
    ERROR_VARIABLE err)
  string(TIMESTAMP t1 "%s")
  math(EXPR secs "${t1} - ${t0}")
  message(STATUS "${example} (${secs} s):\n${out}")
  if(NOT rc EQUAL 0 OR NOT out MATCHES "${example} ok")
    message(FATAL_ERROR "example ${example} failed (${rc}):\n${out}\n${err}")
  endif()
endforeach()
