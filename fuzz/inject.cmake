# Loaded by CMake right after project(proxynode) when the fuzz build is
# configured with -DCMAKE_PROJECT_proxynode_INCLUDE=<this file> (fuzz/build.sh
# does): reads fuzz/targets.cmake once the top-level CMakeLists.txt is done,
# so the fuzz targets can link proxynode_lib while the main build knows
# nothing about fuzzing. (A deferred call expands variables when it runs,
# hence the copy of the directory.)
set(PN_FUZZ_DIR ${CMAKE_CURRENT_LIST_DIR})
cmake_language(DEFER DIRECTORY ${CMAKE_SOURCE_DIR} CALL include ${PN_FUZZ_DIR}/targets.cmake)
