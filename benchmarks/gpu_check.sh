#!/usr/bin/env bash
# The GPU checks of gigagpt in one run of under 8 minutes, results in $OUT/gpu_results.md (echoed).
#
#   bash benchmarks/gpu_check.sh              on a CUDA machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-smoke  tiny shapes on CPU: exercises this script's logic
#
# Needs python3 with torch (CUDA), lightning, torchmetrics, numpy; no network, no install of
# gigagpt (PYTHONPATH=. is set here). Parts, each time-boxed; a failure is recorded, not fatal:
#   1. machine and versions   2. SDPA flash kernel, fused AdamW, pinned loader, host syncs per step
#   3. 111m at T=2048 bf16: batch x head vocabulary padding sweep, then compile off/on x raw loop /
#      Lightning, then a profile of one step (kernel time by category, device idle share)
#   4. FSDP with CPU offload on one GPU: 1p3b, then 13b
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
SMOKE=0
[[ ${1:-} == --cpu-smoke ]] && SMOKE=1
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
RES="$OUT/gpu_results.md"
LOG="$OUT/gpu_check.log"
BUDGET_S=${GPU_CHECK_BUDGET_S:-450}  # all parts together; each also has its own limit
START=$(date +%s)

say() { printf '%s\n' "$*" | tee -a "$RES"; }
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

# part LIMIT_S TITLE CMD...: run CMD under min(LIMIT_S, budget left); its output goes to the log
# and the terminal, its last lines into the results; a failure or timeout is noted and skipped.
part() {
  local limit=$1 title=$2 rc t0
  shift 2
  local remaining
  remaining=$(left)
  ((limit > remaining)) && limit=$remaining
  say ""
  say "### $title"
  if ((limit < 15)); then
    say "skipped: the ${BUDGET_S}s budget is spent"
    return
  fi
  t0=$(date +%s)
  { timeout --kill-after=10 "$limit" "$@" 2>&1; echo "__rc=$?"; } | tee -a "$LOG" > "$OUT/part.txt"
  rc=$(grep -o '__rc=[0-9]*' "$OUT/part.txt" | tail -1 | cut -d= -f2)
  grep -v '__rc=' "$OUT/part.txt" | grep -v -E '^\s*$|━|it/s|train/' | tail -n "${TAIL:-40}" | sed 's/^/    /' | tee -a "$RES"
  case $rc in
    0) say "(ok, $(($(date +%s) - t0))s)" ;;
    124) say "(timed out after ${limit}s)" ;;
    137) say "(killed: timed out after ${limit}s, or out of host memory)" ;;
    *) say "(failed: exit $rc after $(($(date +%s) - t0))s)" ;;
  esac
}

: > "$RES"
say "# gigagpt GPU check"
say ""
say "$(date -u '+%Y-%m-%d %H:%M UTC') | host $(hostname) | commit $(git rev-parse --short HEAD 2>/dev/null || echo n/a) | mode $([[ $SMOKE == 1 ]] && echo cpu-smoke || echo gpu)"

# -- 1. machine and versions ----------------------------------------------------------------------
part 30 "machine" bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,power.limit --format=csv 2>&1 || echo "no nvidia-smi"; free -g | head -2; nproc'
part 60 "versions" "$PY" - <<'EOF'
import importlib
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(0), "| capability", torch.cuda.get_device_capability(0))
for name in ("lightning", "torchmetrics", "numpy", "tiktoken", "jsonargparse", "triton", "pytest", "rich"):
    try:
        mod = importlib.import_module(name)
        print(f"{name} {getattr(mod, '__version__', '?')}")
    except Exception as err:
        print(f"{name} missing ({type(err).__name__})")
EOF

# -- 2. speed features -----------------------------------------------------------------------------
part 120 "speed features: flash attention, fused AdamW, pinned loader, syncs per step" "$PY" - <<'EOF'
import warnings
import torch
import lightning as L
from gigagpt.model import GPT, GPTConfig, CausalSelfAttention
from gigagpt.optim import OptimConfig, build_torch_optimizer

cuda = torch.cuda.is_available()
device = torch.device("cuda" if cuda else "cpu")
if cuda:
    # Which attention kernel SDPA picks for the model's attention at T=2048 in bf16.
    from torch.profiler import ProfilerActivity, profile
    cfg = GPTConfig.from_name("111m")
    attn = CausalSelfAttention(cfg).to(device)
    x = torch.randn(4, 2048, cfg.width, device=device, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        attn(x).sum().backward()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            attn(x).sum().backward()
            torch.cuda.synchronize()
    kernels = sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in ("flash", "fmha", "efficient", "cudnn", "attention"))})
    print("SDPA kernels:", kernels or "none recognised")
    print("flash attention used:", any("flash" in k.lower() for k in kernels))
model = GPT(GPTConfig.from_name("tiny")).to(device)
opt, _ = build_torch_optimizer(model, OptimConfig(), 10)
print("AdamW fused:", opt.defaults.get("fused"))
from gigagpt.data import GPTDataModule
print("loader pin_memory on this machine:", torch.cuda.is_available(), "(GPTDataModule pins when CUDA is available)")

if cuda:
    # Host synchronisations during Lightning training steps (tiny model), with and without a bar.
    import tempfile, numpy as np, json, os
    from gigagpt.module import GPTModule
    from gigagpt.callbacks import ThrottledRichProgressBar  # the progress bar gigagpt's CLI uses
    tmp = tempfile.mkdtemp()
    np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint16).tofile(f"{tmp}/train.bin")
    np.random.default_rng(1).integers(0, 256, 20_000, dtype=np.uint16).tofile(f"{tmp}/val.bin")
    json.dump({"dtype": "uint16", "train_max_token_id": 255, "val_max_token_id": 255}, open(f"{tmp}/meta.json", "w"))

    class SyncCount(L.Callback):
        def __init__(self):
            self.counts = {}
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 3:
                torch.cuda.set_sync_debug_mode("warn")
        def on_train_end(self, trainer, pl_module):
            torch.ones(1, device="cuda").item()  # one deliberate sync: proves the counter sees them
            torch.cuda.set_sync_debug_mode(0)

    for bar in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=8,
                                limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                                enable_checkpointing=False, enable_progress_bar=bar, enable_model_summary=False,
                                gradient_clip_val=1.0, log_every_n_steps=50, use_distributed_sampler=False,
                                callbacks=[SyncCount(), *([ThrottledRichProgressBar()] if bar else [])])
            trainer.fit(GPTModule(GPTConfig.from_name("tiny")),
                        datamodule=GPTDataModule(path=tmp, sequence_length=128, batch_size=8))
        syncs = [str(w.message).splitlines()[0][:100] for w in caught if "synchroniz" in str(w.message).lower()]
        print(f"host syncs in 5 Lightning steps (progress bar {'on' if bar else 'off'}): {len(syncs) - 1}"
              " (+1 deliberate control sync, counted: " + ("yes)" if syncs else "NO: counter blind)"))
        for s in sorted(set(syncs)):
            print(f"   {syncs.count(s)} x {s}")
EOF

if "$PY" -c "import pytest" 2>/dev/null; then
  part 60 "pytest: model and benchmarks (torch/lightning of this machine)" "$PY" -m pytest -q -x -p no:cacheprovider tests/test_model.py tests/test_benchmarks.py
fi

# -- 3. 111m throughput ----------------------------------------------------------------------------
if [[ $SMOKE == 1 ]]; then
  SHAPE=(--depth 2 --width 64 --heads 2 --vocab 512 --seq 64)
  SWEEP="2,4"; PREC=32-true,bf16-mixed; STEPS=(--steps 2 --warmup 1); LABEL="smoke shape T=64"
else
  SHAPE=(--model 111m --seq 2048)
  SWEEP="16,32"; PREC=bf16-mixed; STEPS=(--steps 10 --warmup 3); LABEL="111m T=2048"
fi
TAIL=4  # the benchmark appends its own table to the results
part 100 "$LABEL $PREC: batch x head vocabulary padding (1 = 50,257 wide, 64 = 50,304), raw loop, compile off" \
  "$PY" benchmarks/bench_train.py "${SHAPE[@]}" --batch "$SWEEP" --precision "$PREC" --vocab-pad 1,64 \
  --modes raw --rounds 1 "${STEPS[@]}" --json "$OUT/sweep.json" --markdown "$RES"
read -r BEST PAD < <("$PY" -c "
import json
rows = [r for r in json.load(open('$OUT/sweep.json'))['results'] if not r['error']]
best = max(rows, key=lambda r: r['tokens_per_s']) if rows else {'batch': '${SWEEP%%,*}', 'vocab_pad': 64}
print(best['batch'], best['vocab_pad'])" 2>/dev/null || echo "${SWEEP%%,*} 64")
say "fastest: batch $BEST, vocab pad $PAD"
[[ $SMOKE == 1 ]] && STEPS=(--steps 2 --warmup 1) || STEPS=(--steps 15 --warmup 5)
part 200 "$LABEL $PREC batch $BEST pad $PAD: compile off/on x raw loop / Lightning (2 interleaved rounds)" \
  "$PY" benchmarks/bench_train.py "${SHAPE[@]}" --batch "$BEST" --precision "$PREC" --compile off,on \
  --vocab-pad "$PAD" --modes raw,lightning --rounds 2 "${STEPS[@]}" --json "$OUT/main.json" --markdown "$RES"
if [[ $SMOKE == 1 ]]; then
  PROFILE=(--depth 2 --width 64 --heads 2 --vocab 512 --seq 64 --batch 2)
else
  PROFILE=(--model 111m --seq 2048 --batch "$BEST")
fi
TAIL=70
part 90 "where a step's time goes: $LABEL batch $BEST pad $PAD, compile off then on" bash -c \
  "'$PY' benchmarks/profile_step.py ${PROFILE[*]} --vocab-pad $PAD && '$PY' benchmarks/profile_step.py ${PROFILE[*]} --vocab-pad $PAD --compile --top 8"
TAIL=4

# -- 4. FSDP + CPU offload on one GPU ----------------------------------------------------------------
if [[ $SMOKE == 1 ]]; then
  part 60 "FSDP CPU offload" "$PY" benchmarks/bench_train.py "${SHAPE[@]}" --batch 1 --fsdp-offload
else
  part 100 "FSDP CPU offload: 1p3b, bf16-mixed, batch 1 x 2048" \
    "$PY" benchmarks/bench_train.py --model 1p3b --seq 2048 --batch 1 --precision bf16-mixed \
    --steps 2 --warmup 1 --fsdp-offload --markdown "$RES"
  part 150 "FSDP CPU offload: 13b, bf16-true (bf16 weights and Adam state: 8 bytes/param in host memory), batch 1 x 2048" \
    "$PY" benchmarks/bench_train.py --model 13b --seq 2048 --batch 1 --precision bf16-true \
    --steps 1 --warmup 0 --fsdp-offload --markdown "$RES"
fi

say ""
say "total $(($(date +%s) - START))s; full log: $LOG"
echo
echo "===== $RES ====="
cat "$RES"
