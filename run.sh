#!/usr/bin/env bash
# gigagpt's two commands, each setting up what it needs on a machine with Python 3.11:
#   bash run.sh demo   prepare the built-in corpus, train `tiny` on CPU, print a sample
#   bash run.sh test   the whole test suite, in the core and the cstorch environments
# Environments (created on first use, refreshed when pyproject.toml changes):
#   .venv           current torch (TORCH_SPEC, default torch==2.13.0) + gigagpt[dev,hf,plot,data]
#   .venv-cerebras  cerebras-pytorch==2.10.0 (pins torch 2.4.0, numpy 1.25) + gigagpt[cerebras,dev]
# GIGAGPT_SKIP_CSTORCH=1 skips the cstorch environment (its install is about 6 GB).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
CORE_VENV=${GIGAGPT_VENV:-.venv}
CS_VENV=${GIGAGPT_CS_VENV:-.venv-cerebras}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off

log() { printf '\033[1m[gigagpt]\033[0m %s\n' "$*" >&2; }

# ensure_venv DIR EXTRAS [PIP ARGS...]: create DIR and install gigagpt[EXTRAS] unless up to date.
ensure_venv() {
  local dir=$1 extras=$2; shift 2
  local stamp="$dir/.gigagpt-stamp" want
  want="$(cat pyproject.toml "$0" | sha256sum | cut -c1-16) $extras $*"
  if [[ -f $stamp && "$(cat "$stamp")" == "$want" ]]; then return; fi
  log "setting up $dir (gigagpt[$extras] $*) ..."
  [[ -x $dir/bin/python ]] || "$PYTHON" -m venv "$dir"
  local logfile="$dir/install.log"
  if ! { "$dir/bin/python" -m pip install -q --upgrade pip && "$dir/bin/python" -m pip install -q "$@" -e ".[$extras]"; } \
      > "$logfile" 2>&1; then
    grep -v "^WARNING: Location" "$logfile" | tail -40 >&2
    log "installing into $dir failed (full log: $logfile)"
    exit 1
  fi
  echo "$want" > "$stamp"
}

# Suites of the core environment that run again in the cstorch one (torch 2.4 + numpy 1.25).
CS_CORE_TESTS=(tests/test_model.py tests/test_optim.py tests/test_data.py tests/test_checkpoint.py
  tests/test_convert.py tests/test_cerebras_missing.py tests/test_mup.py tests/test_safe_load.py
  tests/test_generate.py "tests/test_bad_inputs.py::test_bad_input_is_one_line[csx_lowering_without_venv_bin_on_path]")

core_env() { ensure_venv "$CORE_VENV" "dev,hf,plot,data" "$TORCH_SPEC"; }
cs_env() { ensure_venv "$CS_VENV" "cerebras,dev"; }

demo() {
  core_env
  local py="$CORE_VENV/bin/python"
  log "preparing the built-in corpus (CPython's reference docs) ..."
  "$py" -m gigagpt prepare --builtin --output data/builtin
  log "training configs/tiny.yaml on CPU ..."
  "$py" -m gigagpt fit --config configs/tiny.yaml "$@"
  log "sampling from the trained model ..."
  "$py" -m gigagpt sample runs/tiny/checkpoints/last.ckpt --prompt "The for statement" --max-new-tokens 300
}

cs_suites() {
  log "cstorch environment: $("$CS_VENV/bin/python" -c 'import torch, numpy, lightning; print("torch", torch.__version__, "numpy", numpy.__version__, "lightning", lightning.__version__)')"
  # CSX lowering runs torch-cirh-opt from the environment's bin/.
  # The cstorch tests, and the library-level suites again on torch 2.4 + numpy 1.25 (the command-line
  # suites drive the same code through subprocesses and run in the core environment only); then CSX
  # lowering of every shipped size at T=2048, 175b included (validate_only, lazy initialisation).
  PATH="$PWD/$CS_VENV/bin:$PATH" "$CS_VENV/bin/python" -m pytest tests/cstorch "${CS_CORE_TESTS[@]}" "$@"
  if [[ ${GIGAGPT_SKIP_CSX_SIZES:-0} != 1 ]]; then
    GIGAGPT_CSX_SIZES=1 PATH="$PWD/$CS_VENV/bin:$PATH" "$CS_VENV/bin/python" -m pytest tests/cstorch/test_csx_sizes.py "$@"
  fi
}

tests() {
  core_env
  log "core environment: $("$CORE_VENV/bin/python" -c 'import torch, numpy, lightning; print("torch", torch.__version__, "numpy", numpy.__version__, "lightning", lightning.__version__)')"
  "$CORE_VENV/bin/python" -m ruff check gigagpt accelerators callbacks tests benchmarks
  if [[ ${GIGAGPT_SKIP_CSTORCH:-0} == 1 ]]; then
    log "GIGAGPT_SKIP_CSTORCH=1: skipping the cstorch environment"
    "$CORE_VENV/bin/python" -m pytest tests --ignore=tests/cstorch "$@"
    return
  fi
  cs_env
  # The two environments' suites run side by side, one thread each: most of their time is one busy
  # core (interpreter start-up, Python-level loops), so two cores finish both in about the longer one.
  local cs_log cs_pid core_rc=0 cs_rc=0
  cs_log=$(mktemp)
  export OMP_NUM_THREADS=1 GIGAGPT_TEST_THREADS=1
  cs_suites "$@" > "$cs_log" 2>&1 &
  cs_pid=$!
  "$CORE_VENV/bin/python" -m pytest tests --ignore=tests/cstorch "$@" || core_rc=$?
  wait "$cs_pid" || cs_rc=$?
  cat "$cs_log"
  rm -f "$cs_log"
  log "core environment suite: exit $core_rc; cstorch environment suites: exit $cs_rc"
  [[ $core_rc == 0 && $cs_rc == 0 ]]
}

case "${1:-}" in
  demo) shift; demo "$@" ;;
  test) shift; tests "$@" ;;
  *) echo "usage: bash run.sh demo|test [extra args]" >&2; exit 2 ;;
esac
