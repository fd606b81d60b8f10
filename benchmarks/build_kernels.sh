#!/usr/bin/env bash
# Build the third-party attention kernels attnpatch wraps, from source, on a GPU box with no network
# (issue 13). Sources: the tarballs kept beside the project (../shared/src/: SageAttention-d1a57a5,
# flash-attention-0251105a, cutlass-7127592-include) and, for xformers, `git archive`s of the public
# repositories (docs/GPU_BACKENDS.md, xformers row); copy them into DIR first.
#
#   bash benchmarks/build_kernels.sh DIR [sage2] [fa3] [fa2] [fa4] [xformers]     # default: sage2 fa3
#
# Each kernel is installed with pip --target into DIR/<name>/site (put it on PYTHONPATH), its log in
# DIR/<name>.log, its wall time and result in DIR/<name>.status. Builds run one after another; run this
# in the background (setsid) while the GPU does other work.
#
# * sage2: SageAttention 2.2.0 (CUDA + Triton kernels), for sm90 only (TORCH_CUDA_ARCH_LIST=9.0): ~3.5 min
#   with 16 cores. Its setup.py reads README.md, which the tarball keeps.
# * fa3: FlashAttention 3 (flash-attention's hopper/), shrunk with its FLASH_ATTENTION_DISABLE_* switches
#   to what attnpatch's matrix needs first: forward only, bf16, fp16 and fp8 e4m3 (the `flash_attn3_fp8`
#   backend), head dims 64 and 128, varlen and local (sliding window / causal translation) kept; no
#   split-KV, paged KV, append-KV, softcap, packed GQA, clusters, other head dims or sm80 kernels
#   (FA3_DISABLE="..." replaces that list). Widen by
#   unsetting switches (each adds translation units of several minutes each). ~2 min with 8-16 jobs on
#   16 cores (H200 box, 2026-11-30: 124-134 s); accuracy, compile and CUDA-graph tests pass on it.
# * fa4: the flash-attn-4 wheel and its CUTLASS DSL stack, from wheels in DIR/fa4-wheels (the 92 MB
#   CUDA-13 DSL library joined from part.* files, see ../shared/gpu/wheels.sh); its .pth file is not
#   read from PYTHONPATH, so DIR/fa4/site gets a sitecustomize.py that calls site.addsitedir. The set must
#   include nvidia-cutlass-dsl-libs-core (the DSL's Python package itself: cutlass/__init__.py and
#   cutlass/cute/, a dependency of libs-base since 4.8 that a --no-deps download misses: the cause of the
#   "No module named 'cutlass.cute'" seen on 2026-11-30), cuda-bindings, cuda-pathfinder, protobuf and
#   einops besides flash-attn-4, nvidia-cutlass-dsl, libs-base, libs-cu13, quack-kernels, apache-tvm-ffi and
#   torch-c-dlpack-ext (each wheel's Requires-Dist, read 2026-11-30). Over 64 MiB in all: bring it in two
#   calls (the parts of libs-cu13 apart) into DIR/fa4-wheels, then run this.
# * fa2: FlashAttention 2 (csrc/flash_attn) shrunk to forward, fp16/bf16, head dims 64 and 128 (24 of its
#   ~100 kernel units; larger head dims raise, backward raises): 543 s with 12 jobs beside other builds
#   (H200 box, 2026-11-30), 662 s with 16 jobs beside other builds. The full build does not fit one 10-minute
#   call. FA2_HDIMS="64" keeps head dim 64 only (12 units; larger head dims raise). ALiBi is compiled out too
#   (FLASHATTENTION_DISABLE_ALIBI: half the kernel variants per unit; attnpatch never passes alibi_slopes, and
#   FA2 itself refuses them in such a build: "This flash attention build does not support alibi").
# * xformers: xFormers 0.0.35 (tag v0.0.35, a git archive: DIR/xformers-03b91d7.tar.gz) with CUTLASS's
#   include/ and tools/util/include/ (DIR/xformers-cutlass-8afb19d.tar.gz, its pinned commit, else the
#   kept cutlass-*-include tarball). Its extension holds no attention kernels: on CUDA its dispatcher runs
#   FlashAttention 3 / 2 when they import, else torch's own efficient and flash kernels; the extension is
#   needed only because without it every CUDA op refuses. 11 .cu + 2 .cpp units: 140 s with 16 jobs (H200
#   box, 2026-11-30, after SageAttention 2's build; XF_SELECTIVE=nvcc_info: one unit, enough for
#   memory_efficient_attention). Keep the FA2/FA3 builds off PYTHONPATH to measure xformers' own path (its
#   dispatcher tries them first).
set -u
DIR="${1:?usage: build_kernels.sh DIR [sage2] [fa3] [fa2] [fa4] [xformers]}"
shift
WHAT=("$@")
[ ${#WHAT[@]} -eq 0 ] && WHAT=(sage2 fa3)
DIR="$(cd "$DIR" && pwd)"
JOBS="${MAX_JOBS:-$(nproc)}"
PY="${PYTHON:-python3}"

sage2() {
  rm -rf "$DIR/sage2" && mkdir -p "$DIR/sage2/src"
  tar xzf "$DIR"/SageAttention-*.tar.gz -C "$DIR/sage2/src" --strip-components=1
  cd "$DIR/sage2/src" && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$JOBS" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index --target "$DIR/sage2/site" .
}

fa3() {
  rm -rf "$DIR/fa3" && mkdir -p "$DIR/fa3/src"
  tar xzf "$DIR"/flash-attention-*.tar.gz -C "$DIR/fa3/src" --strip-components=1
  mkdir -p "$DIR/fa3/src/csrc/cutlass"
  tar xzf "$DIR"/cutlass-*-include.tar.gz -C "$DIR/fa3/src/csrc/cutlass" --strip-components=1
  [ -d "$DIR/fa3/src/csrc/cutlass/include" ] || { echo "cutlass include/ not found after unpacking"; return 1; }
  local off
  # FP16 stays on: the build without fp16 kernels segfaulted on an fp16 call instead of raising (H200,
  # docs/GPU_BACKENDS.md), and the matrix has fp16 cases. FA3_DISABLE replaces the list.
  for off in ${FA3_DISABLE:-BACKWARD SPLIT PAGEDKV APPENDKV SOFTCAP PACKGQA CLUSTER HDIM96 HDIM192 HDIM256 SM80 \
             HDIMDIFF64 HDIMDIFF192}; do
    export "FLASH_ATTENTION_DISABLE_$off=TRUE"
  done
  cd "$DIR/fa3/src/hopper" && FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS="$JOBS" NVCC_THREADS=4 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index --target "$DIR/fa3/site" .
}

fa2() {
  # FlashAttention 2 (csrc/flash_attn) shrunk to attnpatch's matrix: forward only (its own
  # FLASHATTENTION_DISABLE_BACKWARD, plus run_mha_bwd's body guarded so no backward kernel is referenced), no ALiBi,
  # fp16 and bf16, head dims 64 and 128 (HEADDIM_SWITCH: d <= 64 runs the 64 kernel, d <= 128 the 128 one,
  # larger raises), sm90 code of its sm80 kernels. 24 kernel translation units of the ~100.
  rm -rf "$DIR/fa2" && mkdir -p "$DIR/fa2/src"
  tar xzf "$DIR"/flash-attention-*.tar.gz -C "$DIR/fa2/src" --strip-components=1
  mkdir -p "$DIR/fa2/src/csrc/cutlass"
  tar xzf "$DIR"/cutlass-*-include.tar.gz -C "$DIR/fa2/src/csrc/cutlass" --strip-components=1
  cd "$DIR/fa2/src" && "$PY" - <<'PYEOF' || return 1
import re
s = open("setup.py").read()
import os
dims = [int(d) for d in os.environ.get("FA2_HDIMS", "64 128").split()]
assert dims and set(dims) <= {64, 128}, f"FA2_HDIMS: 64 and/or 128, got {dims}"
s = re.sub(r'\n\s*"csrc/flash_attn/src/flash_(bwd|fwd|fwd_split|fwd_split_align)_hdim(\d+)_[^"]*\.cu",',
           lambda m: m.group(0) if m.group(1) != "bwd" and int(m.group(2)) in dims else "", s)
assert s.count("feature_flags = []") == 1
s = s.replace("feature_flags = []", 'feature_flags = ["-DFLASHATTENTION_DISABLE_BACKWARD", "-DFLASHATTENTION_DISABLE_ALIBI"]')
open("setup.py", "w").write(s)
h = "csrc/flash_attn/src/static_switch.h"
t = open(h).read()
i = t.index("#define HEADDIM_SWITCH")
branches = "".join(
    f"    {'if' if n == 0 else '} else if'} (HEADDIM <= {d}) {{ constexpr static int kHeadDim = {d}; return __VA_ARGS__(); \\\n"
    for n, d in enumerate(sorted(dims)))
t = t[:i] + ("#define HEADDIM_SWITCH(HEADDIM, ...) \\\n  [&] { \\\n" + branches +
             f'    }} else {{ throw std::runtime_error("this FlashAttention 2 build has head dims {dims} only"); }} \\\n'
             "  }()\n")
open(h, "w").write("#include <stdexcept>\n" + t)
a = "csrc/flash_attn/flash_api.cpp"
c = open(a).read()
old = "void run_mha_bwd(Flash_bwd_params &params, cudaStream_t stream) {\n"
assert c.count(old) == 1
j = c.index(old) + len(old)
k = c.index("\n}\n", j)
c = c[:j] + "#ifndef FLASHATTENTION_DISABLE_BACKWARD\n" + c[j:k] + "\n#endif" + c[k:]
open(a, "w").write(c)
print("fa2 sources:", s.count('sm80.cu"'))
PYEOF
  FLASH_ATTENTION_FORCE_BUILD=TRUE FLASH_ATTN_CUDA_ARCHS=90 MAX_JOBS="$JOBS" NVCC_THREADS=2 \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index --target "$DIR/fa2/site" .
}

fa4() {
  rm -rf "$DIR/fa4" && mkdir -p "$DIR/fa4/site"
  local w="$DIR/fa4-wheels"
  [ -f "$w/BIG_WHEEL_NAME" ] && [ ! -f "$w/$(cat "$w/BIG_WHEEL_NAME")" ] && cat "$w"/part.* > "$w/$(cat "$w/BIG_WHEEL_NAME")"
  "$PY" -m pip install --no-index --no-deps --target "$DIR/fa4/site" "$w"/*.whl &&
    printf "import site\nsite.addsitedir('%s')\n" "$DIR/fa4/site" > "$DIR/fa4/site/sitecustomize.py"
}

xformers() {
  rm -rf "$DIR/xformers" && mkdir -p "$DIR/xformers/src"
  tar xzf "$DIR"/xformers-03b91d7.tar.gz -C "$DIR/xformers/src" --strip-components=1 || return 1
  local cut="$DIR/xformers/src/third_party/cutlass" ct
  rm -rf "$cut" && mkdir -p "$cut"
  ct=$(ls "$DIR"/xformers-cutlass-*.tar.gz 2>/dev/null | head -1)
  [ -n "$ct" ] || ct=$(ls "$DIR"/cutlass-*-include.tar.gz | head -1)
  echo "xformers: CUTLASS from $ct"
  tar xzf "$ct" -C "$cut" --strip-components=1 || return 1
  [ -f "$cut/include/cutlass/cutlass.h" ] && [ -f "$cut/tools/util/include/cutlass/util/packed_stride.hpp" ] ||
    { echo "cutlass include/ or tools/util/include/ not found after unpacking"; return 1; }
  cd "$DIR/xformers/src" && "$PY" - <<'PYEOF' || return 1
# setup.py registers its bdist_wheel subclass on wheel.bdist_wheel only; without the `wheel` package the
# class derives from object and pip's build_wheel fails. Fall back to setuptools' own bdist_wheel.
s = open("setup.py").read()
old = "    from wheel.bdist_wheel import bdist_wheel as _bdist_wheel\n"
assert s.count(old) == 1
s = s.replace(old, "    try:\n        from setuptools.command.bdist_wheel import bdist_wheel as _bdist_wheel\n"
                   "    except ImportError:\n        from wheel.bdist_wheel import bdist_wheel as _bdist_wheel\n")
open("setup.py", "w").write(s)
PYEOF
  [ -n "${XF_SELECTIVE:-}" ] && export XFORMERS_SELECTIVE_BUILD="$XF_SELECTIVE"
  # 9.0a, not 9.0: sparse24_gemm_sm90.cu's CUTLASS 3 kernels (wgmma) need the arch-specific target (xformers'
  # CI builds "8.0 9.0a ..."). Release drops --generate-line-info (RelWithDebInfo is setup.py's default).
  # setup.py already passes nvcc --threads 4.
  TORCH_CUDA_ARCH_LIST=9.0a XFORMERS_BUILD_TYPE=Release MAX_JOBS="$JOBS" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index --target "$DIR/xformers/site" . || return 1
  # Check: _C loaded with CUDA metadata, and one call through the dispatcher.
  cd "$DIR" && PYTHONPATH="$DIR/xformers/site" "$PY" - <<'PYEOF'
import torch, xformers, xformers.ops as xops
from xformers import _cpp_lib
assert _cpp_lib._cpp_library_load_exception is None, _cpp_lib._cpp_library_load_exception
print("xformers", xformers.__version__, xformers.__file__, _cpp_lib._build_metadata.metadata)
q = torch.randn(2, 256, 8, 64, device="cuda", dtype=torch.half)
for op in (xops.fmha.cutlass.FwOp, None):
    o = xops.memory_efficient_attention_forward(q, q, q, op=op) if op else xops.memory_efficient_attention(q, q, q)
    r = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, q, q))).transpose(1, 2)
    print(op.NAME if op else "auto", "max abs err vs sdpa", (o - r).abs().max().item())
PYEOF
}

for k in "${WHAT[@]}"; do
  t0=$SECONDS
  ( "$k" ) > "$DIR/$k.log" 2>&1
  rc=$?
  echo "$k rc=$rc $((SECONDS - t0))s" | tee "$DIR/$k.status"
done
