# CMake toolchain file: cross-compile for aarch64 Linux with Debian's GCC cross compiler
# (g++-aarch64-linux-gnu). Used by .ci/aarch64.sh; CXX_AARCH64 names another compiler.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
if(DEFINED ENV{CXX_AARCH64})
  set(CMAKE_CXX_COMPILER "$ENV{CXX_AARCH64}")
else()
  set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
endif()
# Host programs (cmake's helpers, python) run on the build machine; headers and libraries are the
# cross compiler's own, plus what -DPython_INCLUDE_DIR points at.
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
