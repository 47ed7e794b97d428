#!/usr/bin/env bash
# The GPU checks of issue 10 item 5, in one command on the lent GPU machine.
#
# Here first:  python .ci/device/prepare.py [--build-python PY]   (fills .ci/device/wheels, ~39 MiB;
#              with a Python that has the GPU machine's CUDA torch, also TE's torch extension)
# Then:        the device tool's run(command="bash .ci/device/run.sh", carry=[".ci/device/wheels"],
#                                    timeout_s=600)
#
# Stages (each logged to $OUT/<stage>.log, its start and end in $OUT/summary.txt; each
# has a limit, cut to the time left, so the whole run ends by DEADLINE seconds; the
# limits sum to more, so a slow build or test stage leaves the benchmarks less time;
# the exit status is 1 if any stage failed):
#   env      GPU, torch, CUDA, cuDNN, nvcc, ninja, numpy, glibc, site-packages
#   install  the staged wheels: megatron-core, pydantic, einops, wheel into $SITE;
#            Transformer Engine (its core library cut to sm_90, its Python package) into
#            $SITE_TE, which goes on PYTHONPATH only once TE imports: a broken TE (a
#            missing extension, cuDNN not found) raises errors megatron-core's TE guard
#            does not catch, and would take the torch-backend tests and benchmark down too
#   build    transformer-engine-torch: the prebuilt wheel if it was built for this torch,
#            else from source (a C++ extension; ninja, MAX_JOBS cores: 7 min on 2 cores);
#            the wheel built here is copied to $OUT: put it and its .torch-version into
#            .ci/device/wheels and the next run skips the build (prepare.py keeps them)
#   te       import transformer_engine.pytorch, one windowed DotProductAttention call
#   bench-te model step, TE spec: megatron-core's stock TE-spec GPTModel vs ConSA + TE backend
#            (NVTE_DEBUG logs the attention backend TE picked: FusedAttention, not the unfused
#            path with a dense window mask); only when te passed
#   tests-te the TE tests of tests/gpu (TE backend vs torch backend, TE layer spec), only when te
#            passed, with CONSA_REQUIRE_TE=1 (a TE skip is a failure)
#   tests    pytest tests/gpu, test names as they run, the TE tests left out when tests-te ran them
#            (the torch backend's CUDA kernels, NCCL runs, async save, determinism)
#   bench    model step, torch backend (local spec): stock, all-FA, 75% SWA, learning
# The benchmarks come before the tests and the test stage is capped, so the figures the
# README needs are taken first. STAGES="env install build te tests" runs a subset; a warm
# machine keeps $SITE, $SITE_TE and the built extension between commands (the install and
# build stages then skip). Set DEADLINE to the run's limit_s less about 20 s.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/consa_device_out}
SITE=${SITE:-/tmp/consa_site}
SITE_TE=${SITE_TE:-/tmp/consa_site_te}
BUILD=${BUILD:-/tmp/consa_te_build}
WHEELS=${WHEELS:-.ci/device/wheels}
PY=${PYTHON:-python3}
DEADLINE=${DEADLINE:-580}
LIMIT_SCALE=${LIMIT_SCALE:-1}  # stage limits x this (prepare.py's build on a 2-core machine: 20)
STAGES=${STAGES:-env install build te bench-te tests-te tests bench}
BENCH_ARGS=${BENCH_ARGS:---device cuda --dtype bf16 --seq-len 8192 --window 1024 --layers 4 --hidden 2048 --heads 16 --kv-heads 8 --head-dim 128 --reps 10}
mkdir -p "$OUT"
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_BREAK_SYSTEM_PACKAGES=1
# TE loads cuDNN, cuBLAS and NCCL by name: where CUDA torch's pip packages keep them, and the toolkit
NVIDIA_LIBS=$("$PY" -c "import glob, os, torch; r = os.path.dirname(os.path.dirname(torch.__file__)); print(':'.join(sorted(glob.glob(os.path.join(r, 'nvidia', '*', 'lib')))))" 2>/dev/null)
export LD_LIBRARY_PATH="${NVIDIA_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# TE looks for cuDNN, NVRTC and cuRAND under <NAME>_HOME first, then CUDA_HOME, unversioned names on
# LD_LIBRARY_PATH, and its own Python's purelib: point the first at CUDA torch's pip packages
NVIDIA_ROOT=$("$PY" -c "import os, torch; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), 'nvidia'))" 2>/dev/null)
if [ -n "$NVIDIA_ROOT" ] && [ -d "$NVIDIA_ROOT" ]; then  # (cuDNN's own folder, as TE's README sets it)
  [ -n "${CUDNN_HOME:-}" ] || [ ! -d "$NVIDIA_ROOT/cudnn" ] || export CUDNN_HOME=$NVIDIA_ROOT/cudnn
  for lib in NVRTC CURAND; do v=${lib}_HOME; [ -n "${!v:-}" ] || export "$v=$NVIDIA_ROOT"; done
fi
if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda "$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")")"; do
    if [ -f "$c/include/cuda_runtime.h" ]; then export CUDA_HOME=$c; break; fi
  done
fi

log() { echo "[+${SECONDS}s] $*" | tee -a "$OUT/summary.txt"; }

# stage NAME LIMIT CMD...: run CMD with at most LIMIT seconds (less if the deadline is nearer)
stage() {
  local name=$1 limit=$2 rc
  shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  limit=$((limit * LIMIT_SCALE))
  local left=$((DEADLINE - SECONDS))
  if ((left < 15)); then log "$name: skipped, ${left}s left"; return 1; fi
  ((limit > left)) && limit=$left
  log "$name: start (limit ${limit}s)"
  timeout --kill-after=5 "$limit" bash -c '"$@"' "$name" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  log "$name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)')"
  tail -n 25 "$OUT/$name.log"
  return $rc
}

env_info() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  command -v nvcc && nvcc --version | tail -2
  command -v ninja && ninja --version
  "$PY" -m pip --version
  "$PY" -c "import numpy, platform, sysconfig, torch; print('numpy', numpy.__version__, 'glibc', platform.libc_ver()); print('cudnn', torch.backends.cudnn.version()); print('purelib', sysconfig.get_path('purelib'), 'torch at', torch.__file__)"
  echo "CUDA_HOME=${CUDA_HOME:-unset} CUDNN_HOME=${CUDNN_HOME:-unset} NVRTC_HOME=${NVRTC_HOME:-unset} CURAND_HOME=${CURAND_HOME:-unset}"
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  nproc
}

install_wheels() {
  if [ -f "$SITE/.installed" ] && [ -f "$SITE_TE/.installed" ]; then echo "already installed in $SITE, $SITE_TE"; return 0; fi
  rm -rf "$SITE" "$SITE_TE"
  local wheels te_wheels
  wheels=$(ls "$WHEELS"/*.whl | grep -v /transformer_engine)
  te_wheels=$(ls "$WHEELS"/transformer_engine*.whl | grep -v /transformer_engine_torch-)
  "$PY" -m pip install --no-deps --target "$SITE" $wheels && touch "$SITE/.installed" \
    && "$PY" -m pip install --no-deps --target "$SITE_TE" $te_wheels && touch "$SITE_TE/.installed"
}

# CMD with Transformer Engine importable
with_te() { PYTHONPATH="$SITE_TE:$PYTHONPATH" "$@"; }

# A wheel into $SITE_TE by extraction: its extension goes into transformer_engine/wheel_lib,
# a folder `pip install --target` will not add to (it skips a top-level folder that exists).
extract_wheel() {
  "$PY" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" "$1" "$SITE_TE"
  echo "extracted $1 into $SITE_TE"
}

build_te_torch() {
  if ls "$SITE_TE"/transformer_engine/wheel_lib/transformer_engine_torch*.so >/dev/null 2>&1; then
    echo "already built"; return 0
  fi
  # prepare.py --build-python may have built it here against the same torch
  local torch_version prebuilt
  torch_version=$("$PY" -c "import torch; print(torch.__version__)")
  prebuilt=$(ls "$WHEELS"/transformer_engine_torch-*.whl 2>/dev/null | head -1)
  if [ -n "$prebuilt" ] && [ "$(cat "$WHEELS/transformer_engine_torch.torch-version" 2>/dev/null)" = "$torch_version" ]; then
    echo "prebuilt for torch $torch_version: $prebuilt"
    extract_wheel "$prebuilt"
    # built on another machine: loadable here (glibc, libstdc++)? else build it
    if with_te "$PY" -c "import torch, transformer_engine.pytorch"; then
      return 0
    fi
    echo "the prebuilt extension does not load here: building it"
    rm -f "$SITE_TE"/transformer_engine/wheel_lib/transformer_engine_torch*.so
  fi
  echo "building for torch $torch_version${prebuilt:+ (the prebuilt wheel is for torch $(cat "$WHEELS/transformer_engine_torch.torch-version" 2>/dev/null))}"
  # The toolkit's headers first (TE finds it through CUDA_HOME, set above, else next to
  # nvcc, which may be a wrapper script in /usr/local/bin), then what CUDA torch's pip
  # packages carry and a bare toolkit lacks: cuBLAS, cuDNN, NCCL (nvidia/*/include).
  echo "CUDA_HOME=${CUDA_HOME:-unset}"
  local inc
  inc=$("$PY" -c "import glob, os, torch; r = os.path.dirname(os.path.dirname(torch.__file__)); print(':'.join(sorted(glob.glob(os.path.join(r, 'nvidia', '*', 'include')))))")
  export CPATH="${inc}${CPATH:+:$CPATH}"
  # NVTE_NO_LOCAL_VERSION: no +sha suffix, which TE's check against the core library's version would refuse
  export NVTE_PYTORCH_FORCE_BUILD=TRUE NVTE_FRAMEWORK=pytorch NVTE_WITH_NCCL_EP=0 NVTE_CUDA_ARCHS=90 NVTE_NO_LOCAL_VERSION=1
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  rm -rf "$BUILD" && mkdir -p "$BUILD"
  "$PY" -m pip wheel --no-deps --no-build-isolation -v -w "$BUILD" "$WHEELS"/transformer_engine_torch-*.tar.gz \
    && extract_wheel "$(ls "$BUILD"/transformer_engine_torch-*.whl)" \
    && echo "$torch_version" >"$BUILD/transformer_engine_torch.torch-version" \
    && cp "$BUILD"/transformer_engine_torch-*.whl "$BUILD/transformer_engine_torch.torch-version" "$OUT/" \
    && echo "copied the built wheel to $OUT: stage it in .ci/device/wheels to skip this build next time"
}

te_import() {
  "$PY" - <<'EOF'
import torch
import transformer_engine
import transformer_engine.pytorch as te
from megatron_consa.backends.select import transformer_engine_available
print("transformer_engine", transformer_engine.__version__, "from", transformer_engine.__file__)
attn = te.DotProductAttention(num_attention_heads=4, kv_channels=64, num_gqa_groups=2, attn_mask_type="causal",
                              qkv_format="sbhd", window_size=(31, 0)).cuda()
q = torch.randn(256, 2, 4, 64, device="cuda", dtype=torch.bfloat16)
k, v = (torch.randn(256, 2, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
print("DotProductAttention out", tuple(attn(q, k, v).shape))
assert transformer_engine_available(), "megatron_consa does not see Transformer Engine"
EOF
}

bench() { "$PY" benchmarks/model_step.py $BENCH_ARGS --json "$OUT/$1.json" "${@:2}"; }
# the TE spec's step, with TE logging which attention backend it runs (FusedAttention expected)
bench_te() { NVTE_DEBUG=1 NVTE_DEBUG_LEVEL=1 bench model_step_te --transformer-engine; }

export OUT SITE SITE_TE BUILD WHEELS PY BENCH_ARGS
export -f env_info install_wheels with_te extract_wheel build_te_torch te_import bench bench_te

log "device checks at $(git rev-parse --short HEAD 2>/dev/null || echo '?'), stages: $STAGES"
stage env 30 env_info
stage install 120 install_wheels || { log "install failed: nothing else can run"; exit 1; }
failed=0
stage build 300 build_te_torch || failed=1
te_ok=0
if stage te 60 with_te te_import; then
  te_ok=1
  export PYTHONPATH="$SITE_TE:$PYTHONPATH" CONSA_REQUIRE_TE=1  # TE imports: every later stage has it
  stage bench-te 120 bench_te || failed=1
else
  failed=1
  log "bench-te: skipped, Transformer Engine does not import (te.log); the tests and bench run without it"
fi
PYTEST=("$PY" -m pytest -v -rA --durations=0 -p no:cacheprovider)
G=tests/gpu/test_gpu_backends.py
TE_TESTS=("$G::TestCudaAttention::test_fixed_mode_bf16_matches_dense_fp64[te]"
          "$G::TestCudaAttention::test_te_learning_mode_matches_torch_backend"
          "$G::TestCudaAttention::test_te_backend_selects_once_per_configuration"
          "$G::TestSingleRankNccl::test_te_backend_run_matches_torch_backend"
          "$G::TestSingleRankNccl::test_te_layer_spec_run_matches_torch_backend_in_the_same_spec"
          "$G::TestTransformerEngineSpec")
deselect=()
case " $STAGES " in *" tests-te "*) te_first=1 ;; *) te_first=0 ;; esac
if ((te_ok && te_first)); then  # the TE tests first: behind the torch-backend runs the cap could cut them
  stage tests-te 150 "${PYTEST[@]}" "${TE_TESTS[@]}" || failed=1
  for t in "${TE_TESTS[@]}"; do deselect+=(--deselect "$t"); done
fi
stage tests 150 "${PYTEST[@]}" tests/gpu "${deselect[@]}" || failed=1
stage bench 120 bench model_step_torch || failed=1
log "done$( ((failed)) && echo ', with failures (see above)')"
exit $failed
