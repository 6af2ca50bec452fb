# CMake toolchain file: cross-compile with zig's clang-based toolchain (the ziglang package from
# PyPI). The environment names the target: ZIG_TARGET (a zig target triple: aarch64-macos,
# x86_64-macos, x86_64-linux-musl) and ZIG_CXX / ZIG_AR / ZIG_RANLIB (wrapper scripts that run
# `zig c++ -target $ZIG_TARGET`, `zig ar`, `zig ranlib`; .ci/cross.sh makes them).
set(_zig_target "$ENV{ZIG_TARGET}")
string(REGEX MATCH "^[^-]+" _zig_arch "${_zig_target}")
if(_zig_target MATCHES "-macos")
  set(CMAKE_SYSTEM_NAME Darwin)
  if(_zig_arch STREQUAL "aarch64")
    set(_zig_arch arm64)  # what a Mac reports
  endif()
  set(CMAKE_OSX_SYSROOT "")  # zig brings the macOS headers and libSystem stubs
else()
  set(CMAKE_SYSTEM_NAME Linux)
endif()
set(CMAKE_SYSTEM_PROCESSOR "${_zig_arch}")
set(CMAKE_CXX_COMPILER "$ENV{ZIG_CXX}")
set(CMAKE_AR "$ENV{ZIG_AR}" CACHE FILEPATH "")
set(CMAKE_RANLIB "$ENV{ZIG_RANLIB}" CACHE FILEPATH "")
# The host's strip cannot read Mach-O files (it crashes on them) and zig has none: the
# check keeps the module unstripped.
set(CMAKE_STRIP true CACHE FILEPATH "")
# Compiler checks compile without linking: a link would make zig build its libc++ for the target
# during configuration (about 40 s of CPU), before the build decides whether it needs it.
set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY)
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# CMake 3.28+ scans C++20 sources for modules with clang-scan-deps when the compiler is Clang;
# zig ships none, and optkern uses no modules.
set(CMAKE_CXX_SCAN_FOR_MODULES OFF)
