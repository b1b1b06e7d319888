# Compiles the CMake targets named in QUICK_TARGETS (a ;-list) at -O1, the rest as configured.
# Given to llama.cpp's configure as CMAKE_PROJECT_INCLUDE (CMake includes it after each
# project() call); the host CPU set's quick_targets in pipeline/matrix.yaml name the targets.
# The targets exist only once every directory is read: the change is deferred to the end of
# the top-level directory. The -O1 comes after Release's -O3 on each command line: the last
# -O wins.
if(CMAKE_CURRENT_SOURCE_DIR STREQUAL CMAKE_SOURCE_DIR AND QUICK_TARGETS)
    function(quick_targets_at_o1)
        foreach(name IN LISTS QUICK_TARGETS)
            if(NOT TARGET "${name}")
                message(FATAL_ERROR "quick-targets: this llama.cpp has no target '${name}': "
                    "update cpu_variants.host.quick_targets in pipeline/matrix.yaml")
            endif()
            set_property(TARGET "${name}" APPEND PROPERTY COMPILE_OPTIONS -O1)
        endforeach()
        message(STATUS "quick-targets: at -O1: ${QUICK_TARGETS}")
    endfunction()
    cmake_language(DEFER CALL quick_targets_at_o1)
endif()
