# libFuzzer targets (see fuzz/README.md), read at the end of the top-level
# CMakeLists.txt through fuzz/inject.cmake. The whole tree is compiled with
# -fsanitize=fuzzer-no-link,address,undefined (fuzz/build.sh sets
# CMAKE_C_FLAGS); each target links the fuzzer runtime on top. Targets that
# serve a real connection share fuzz/common.c.
set(PN_FUZZ_CONN_TARGETS fuzz_http1 fuzz_h2 fuzz_ws fuzz_marzban fuzz_gozargah)
set(PN_FUZZ_TARGETS fuzz_grpc_decoder fuzz_proto_msgs fuzz_chunks fuzz_coreconf fuzz_mzconf
                    fuzz_env)
add_custom_target(fuzz_all)
foreach(t ${PN_FUZZ_CONN_TARGETS} ${PN_FUZZ_TARGETS})
  set(srcs ${CMAKE_SOURCE_DIR}/fuzz/${t}.c)
  if(t IN_LIST PN_FUZZ_CONN_TARGETS)
    list(APPEND srcs ${CMAKE_SOURCE_DIR}/fuzz/common.c)
  endif()
  add_executable(${t} ${srcs})
  target_link_libraries(${t} PRIVATE proxynode_lib)
  target_link_options(${t} PRIVATE -fsanitize=fuzzer)
  add_dependencies(fuzz_all ${t})
endforeach()
