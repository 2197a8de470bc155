#!/usr/bin/env bash
# Runs the cuda tests (runtime/, comm/ and model/tests/cuda.rs) against a fake
# libcuda.so.1 (runtime/tests/fake_cuda/fake_cuda.c: host memory, memcpy,
# events that complete when recorded, the test kernels run natively, other
# kernels in the PTX interpreter when FPDT_FAKE_CUDA_INTERP is set), so
# every driver call the backend makes, its error paths, retirement, events
# and teardown run on a machine without a GPU. What needs real concurrency
# (copy/compute overlap) skips there and runs on a GPU (scripts/gpu-check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=target/fake-cuda
mkdir -p "$out"
cc -shared -fPIC -O1 -Wall -Wno-misleading-indentation \
  -o "$out/libcuda.so.1" runtime/tests/fake_cuda/fake_cuda.c
ln -sf libcuda.so.1 "$out/libcuda.so"
# And a fake cuBLASLt (host GEMMs over the fake's memory) for the GEMMs.
cc -shared -fPIC -O1 -Wall -o "$out/libcublasLt.so.13" runtime/tests/fake_cuda/fake_cublaslt.c
export FPDT_CUBLASLT_LIB="$PWD/$out/libcublasLt.so.13"
export LD_LIBRARY_PATH="$PWD/$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log=$(mktemp)
cargo test -p fpdt-runtime --test cuda -- --test-threads=1 2>&1 | tee "$log"
# The in-process group's collectives on cuda (two ranks sharing the GPU).
cargo test -p fpdt-comm --test cuda -- --test-threads=1 2>&1 | tee -a "$log"
# Every PTX kernel test through the cuda launch path (Stream::launch_ptx,
# cuLaunchKernel), the fake handing the kernels to the PTX interpreter.
FPDT_PTX_BACKEND=cuda FPDT_FAKE_CUDA_INTERP=1 \
  cargo test -p fpdt-ptx --test ptx_kernels -- --test-threads=2 2>&1 | tee -a "$log"
# The model's step and AdamW on cuda (P ranks sharing the GPU) equal the cpu device's.
cargo test -p fpdt-model --test cuda -- --test-threads=1 2>&1 | tee -a "$log"
# Its GPU bench runs end to end (tiny sizes; the numbers mean nothing here).
bench=$(FPDT_BENCH_MAX_MIB=1 cargo test -q -p fpdt-comm --bench gpu 2>&1)
if ! grep -q "RESULT comm_a2a_vs_copy" <<<"$bench"; then
  echo "fake-cuda-test: the comm gpu bench did not run:" >&2
  echo "$bench" | tail -8 >&2
  exit 1
fi
# And the PTX GPU bench (copies, attention, FPDT's offloaded attention pass).
bench=$(FPDT_BENCH_TOKENS=256 FPDT_FAKE_CUDA_INTERP=1 cargo test -q -p fpdt-ptx --bench gpu 2>&1)
if ! grep -q "RESULT fpdt_offload" <<<"$bench"; then
  echo "fake-cuda-test: the ptx gpu bench did not run:" >&2
  echo "$bench" | tail -8 >&2
  exit 1
fi
# The fake must have been used: a test that skipped for want of a driver
# would pass without exercising anything.
if grep -q "skipped, no cuBLASLt" "$log"; then
  echo "fake-cuda-test: the fake cuBLASLt was not loaded (a test skipped for want of it)" >&2
  rm -f "$log"
  exit 1
fi
if grep -q "skipped, no GPU" "$log"; then
  echo "fake-cuda-test: the fake driver was not loaded (a test skipped for want of a GPU)" >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
# fpdt info lists the GPU the driver reports.
# The test profile: what `cargo test --workspace` already built for the CLI tests.
cargo build -q --profile test -p fpdt-model --bin fpdt
info=$(target/debug/fpdt info)
if ! grep -q "cuda0: Fake GPU, sm_90" <<<"$info"; then
  echo "fake-cuda-test: fpdt info did not list the fake GPU:" >&2
  echo "$info" | head -8 >&2
  exit 1
fi
# fpdt train runs on the cuda device (a few steps of the default task).
run_dir=$(mktemp -d)
# Small devices: the fake's interpreter copies a launch's region each time.
args=(--seq-len 256 --chunk 64 --steps 4 --warmup 1 --eval-every 2 --eval-batches 1 --no-progress)
train=$(FPDT_FAKE_CUDA_INTERP=1 target/debug/fpdt train --device cuda --device-memory 2M \
  "${args[@]}" --out "$run_dir/cuda" 2>&1) || {
  echo "fake-cuda-test: fpdt train --device cuda failed:" >&2
  echo "$train" | tail -8 >&2
  rm -rf "$run_dir"
  exit 1
}
cpu=$(target/debug/fpdt train --device cpu "${args[@]}" --out "$run_dir/cpu" 2>&1)
rm -rf "$run_dir"
if ! grep -q "on the cuda device" <<<"$train" || ! grep -q "done: 4 steps" <<<"$train"; then
  echo "fake-cuda-test: fpdt train --device cuda did not train on the cuda device:" >&2
  echo "$train" | tail -8 >&2
  exit 1
fi
# The same losses as on the cpu device.
losses() { grep -o 'loss [0-9.]* -> [0-9.]*' <<<"$1" | head -1; }
if [ "$(losses "$train")" != "$(losses "$cpu")" ] || [ -z "$(losses "$cpu")" ]; then
  echo "fake-cuda-test: cuda and cpu training differ: '$(losses "$train")' vs '$(losses "$cpu")'" >&2
  exit 1
fi
# In bf16 the GEMMs go to (the fake) cuBLASLt.
run_dir=$(mktemp -d)
bf16=$(FPDT_FAKE_CUDA_INTERP=1 target/debug/fpdt train --device cuda --device-memory 2M \
  --precision bf16 "${args[@]}" --out "$run_dir/bf16" 2>&1) || true
rm -rf "$run_dir"
if ! grep -q "GEMMs on cuBLASLt" <<<"$bf16" || ! grep -q "done: 4 steps" <<<"$bf16"; then
  echo "fake-cuda-test: fpdt train --device cuda --precision bf16 did not train with cuBLASLt:" >&2
  echo "$bf16" | tail -8 >&2
  exit 1
fi
# The overlap bench on cuda, bf16, a model whose attention and GEMMs run on
# the "GPU" (one size; the numbers mean nothing here).
cfg=$(mktemp --suffix=.json)
cat >"$cfg" <<'JSON'
{"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
 "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": 64, "rope_theta": 10000.0,
 "max_position_embeddings": 4096}
JSON
# --device auto (the default) on a GPU machine: the default f32 tiny model
# stays on the cpu device and says why; a bf16 model at head dim 64 trains
# on the GPU, its losses near the cpu device's.
run_dir=$(mktemp -d)
auto=$(target/debug/fpdt train --seq-len 256 --chunk 64 --steps 1 --warmup 1 --no-progress \
  --out "$run_dir/default" 2>&1) || true
if ! grep -q "but the trainer runs on the cpu device: f32" <<<"$auto" \
  || ! grep -q "on the cpu device, S = " <<<"$auto"; then
  echo "fake-cuda-test: fpdt train (auto) did not choose the cpu device for f32:" >&2
  echo "$auto" | head -4 >&2
  exit 1
fi
bfargs=(--model "$cfg" --precision bf16 --seq-len 256 --chunk 64 --steps 2 --warmup 1
  --seq-stages none --eval-every 2 --eval-batches 1 --no-progress)
auto=$(FPDT_FAKE_CUDA_INTERP=1 target/debug/fpdt train --device-memory 4M "${bfargs[@]}" \
  --out "$run_dir/auto" 2>&1) || true
cpu=$(target/debug/fpdt train --device cpu "${bfargs[@]}" --out "$run_dir/cpu" 2>&1) || true
rm -rf "$run_dir"
if ! grep -q "training on the cuda device" <<<"$auto" \
  || ! grep -q "every layer op as a PTX kernel" <<<"$auto"; then
  echo "fake-cuda-test: fpdt train (auto, bf16, head dim 64) did not train on the cuda device:" >&2
  echo "$auto" | tail -8 >&2
  exit 1
fi
near=$(python3 - "$(losses "$auto")" "$(losses "$cpu")" <<'PY'
import re, sys
a, b = ([float(x) for x in re.findall(r"[0-9.]+", s)] for s in sys.argv[1:3])
print("yes" if len(a) == 2 == len(b) and all(abs(x - y) <= 1e-2 * abs(y) for x, y in zip(a, b)) else "no")
PY
)
if [ "$near" != yes ]; then
  echo "fake-cuda-test: bf16 losses on the GPU '$(losses "$auto")' far from the cpu's '$(losses "$cpu")'" >&2
  exit 1
fi
ov=$(FPDT_FAKE_CUDA_INTERP=1 target/debug/fpdt bench overlap --device cuda --precision bf16 \
  --model "$cfg" --chunks 8 --chunks-per-seq 2 --reps 1 --device-memory 4M --host-memory 32M \
  --no-progress 2>&1) || true
rm -f "$cfg"
if ! grep -q "bf16; median of 1 step each, cuda device" <<<"$ov"; then
  echo "fake-cuda-test: fpdt bench overlap --device cuda did not run:" >&2
  echo "$ov" | tail -8 >&2
  exit 1
fi
echo "fake-cuda-test: the cuda tests, fpdt info, fpdt train --device cuda (f32 and bf16) and auto, and fpdt bench overlap --device cuda passed against the fake driver"
