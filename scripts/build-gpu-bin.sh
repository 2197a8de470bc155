#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs, into .gpu/ (git-ignored), for a GPU
# machine that has no Rust: the cuda-facing test binaries, the GPU bench,
# the fpdt binary, stripped to fit the 64 MiB the device tool carries.
#   scripts/build-gpu-bin.sh && <device run, carry .gpu> scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu
mkdir -p .gpu

collect() {
  # Reads cargo's JSON messages; copies each executable as <package>-<target>.
  python3 -c '
import json, shutil, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    exe = m.get("executable")
    if m.get("reason") != "compiler-artifact" or not exe:
        continue
    # "path+file:///w/ptx#fpdt-ptx@0.1.0", or "...#0.1.0" when the folder
    # has the package name.
    where, _, frag = m["package_id"].partition("#")
    pkg = frag.split("@")[0] if "@" in frag else where.rstrip("/").split("/")[-1]
    name = pkg + "-" + m["target"]["name"]
    if m["target"]["kind"] == ["bin"]:
        name = m["target"]["name"]
    shutil.copy(exe, ".gpu/" + name)
    print("  " + name)
'
}

echo "==> test binaries (the test profile is optimised)"
# The runtime's tests (the cuda ones use the GPU; the others check that the
# cpu and meta devices still behave beside it) and the kernel tests that
# take FPDT_PTX_BACKEND; the interpreter's own tests stay here.
cargo test --no-run --message-format=json -p fpdt-runtime --lib --tests 2>/dev/null | collect || { echo "the build above failed: rerun its cargo command to see why" >&2; exit 1; }
cargo test --no-run --message-format=json -p fpdt-model --test cuda 2>/dev/null | collect || { echo "the build above failed: rerun its cargo command to see why" >&2; exit 1; }
cargo test --no-run --message-format=json -p fpdt-comm --test cuda 2>/dev/null | collect || { echo "the build above failed: rerun its cargo command to see why" >&2; exit 1; }
cargo test --no-run --message-format=json -p fpdt-ptx --lib --test ptx_kernels 2>/dev/null | collect || { echo "the build above failed: rerun its cargo command to see why" >&2; exit 1; }
echo "==> GPU bench"
cargo bench -p fpdt-comm --bench gpu --no-run --message-format=json 2>/dev/null | collect || { echo "the build above failed: rerun its cargo command to see why" >&2; exit 1; }
cargo bench -p fpdt-ptx --bench gpu --no-run --message-format=json 2>/dev/null | collect || { echo "the build above failed: rerun its cargo command to see why" >&2; exit 1; }
echo "==> end-to-end bench (the cpu device beside PyTorch on the GPU machine's CPUs)"
cargo bench -p fpdt-model --bench e2e --no-run --message-format=json 2>/dev/null | collect || { echo "the build above failed: rerun its cargo command to see why" >&2; exit 1; }
echo "==> fpdt"
cargo build --release -p fpdt-model --bin fpdt --message-format=json 2>/dev/null | collect || { echo "the build above failed: rerun its cargo command to see why" >&2; exit 1; }
strip .gpu/* 2>/dev/null || true
size=$(du -sm .gpu | cut -f1)
echo "==> .gpu: ${size} MiB"
if [ "$size" -gt 62 ]; then
  echo "too large to carry (limit 64 MiB): drop binaries from the list above" >&2
  exit 1
fi
