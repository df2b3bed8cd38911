#!/usr/bin/env bash
# Builds teredo_reference.sys with mingw-w64 (apt-get install gcc-mingw-w64-x86-64).
#
#   examples/c-reference/build.sh [OUT_DIR]    # default OUT_DIR: examples/c-reference/out
#
# The import libraries come from the .def files (dlltool); the image is a native-subsystem
# DLL entered at DriverEntry, linked without timestamp so that two builds are identical.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

prefix="${MINGW_PREFIX:-x86_64-w64-mingw32-}"
cc="${prefix}gcc"
dlltool="${prefix}dlltool"
if ! command -v "$cc" >/dev/null; then
    echo "build.sh: $cc not found (apt-get install gcc-mingw-w64-x86-64)" >&2
    exit 127
fi
# mingw-w64's DDK headers (ntddk.h, wdm.h), as the distribution installs them.
ddk="$("$cc" -print-sysroot)/include/ddk"
[ -d "$ddk" ] || ddk=/usr/share/mingw-w64/include/ddk

"$dlltool" --input-def "$here/ntoskrnl.def" --output-lib "$out/libntoskrnl.a"
"$dlltool" --input-def "$here/netio.def" --output-lib "$out/libnetio.a"

# -Wno-multichar: pool tags are written as multi-character constants, as in the WDK samples.
# -ffreestanding -nostdlib: no CRT, no libgcc; what the code needs comes from ntoskrnl.
# -fno-stack-protector -mno-stack-arg-probe: no __stack_chk_* / ___chkstk_ms references
# (every frame is far below a page). -ffile-prefix-map: no build path in the image.
"$cc" -O2 -Wall -Wextra -Werror -Wno-multichar -std=c11 \
    -ffreestanding -fno-stack-protector -mno-stack-arg-probe -fno-builtin-printf \
    -ffile-prefix-map="$here"=. \
    -I "$ddk" -D_AMD64_ -DNTDDI_VERSION=0x0A000000 -D_WIN32_WINNT=0x0A00 \
    -c "$here/teredo_reference.c" -o "$out/teredo_reference.o"

"$cc" -nostdlib -nostartfiles -shared \
    -Wl,--subsystem,native \
    -Wl,--entry,DriverEntry \
    -Wl,--image-base,0x140000000 \
    -Wl,--file-alignment,0x200 -Wl,--section-alignment,0x1000 \
    -Wl,--nxcompat -Wl,--wdmdriver \
    -Wl,--no-insert-timestamp \
    -s \
    -o "$out/teredo_reference.sys" \
    "$out/teredo_reference.o" \
    -L "$out" -lntoskrnl -lnetio

echo "$out/teredo_reference.sys"
