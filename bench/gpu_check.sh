#!/usr/bin/env bash
# What to run the first time a GPU is at hand: every speed figure of the project in one short run
# (under 10 minutes on one H100/H200), offline. Usage, from anywhere:
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default bench/out/gpu_check
#
# In order of importance, each section within its share of the time budget:
#   1. reproduce.py --synthetic --seeds 1: the real wall time of every recipe: the seed's two
#      (each fit stopped after 40 s, its pace and projected time kept), then the modern ones in full
#      (a run still going at the budget is stopped the same way);
#   2. benchmark.py --sections train: train/eval images/s of both networks in fp32, bf16,
#      bf16 + channels_last, + compile;
#   3. probes.py: Lightning fit against a bare PyTorch loop and a bare loop of CUDA-graph steps on the
#      same steps, GPU busy fraction, and every host-device synchronisation in training steps with
#      where it comes from; for fast.yaml also with Lightning's eager step (cuda_graph false).
# OUT_DIR then holds only summary.md, summary.json, reproduce.png and gpu_check.log. Exit status: 0;
# 2 no GPU, 3 missing packages (nothing run); 4 a section failed or hit its time limit (all written).
#
# Nothing is fetched from the network. Missing Python packages are installed from wheelhouse/ at the
# repository root if it exists (pip --no-index); otherwise the script names them and stops.
# Environment: PYTHON (default python3), GPU_CHECK_BUDGET_S (default 540), GPU_CHECK_WORK (scratch
# folder, default a new temporary one), GPU_CHECK_SEED_EXTRA (arguments added to the seed recipes'
# runs, e.g. "--model.init_args.channels_last=true --data.data_on_device=true"; default none: the
# configs as they are), GPU_CHECK_SMOKE=1 (tiny sizes on any device, CPU included: the same code
# path in a few minutes, to check the script itself).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SMOKE="${GPU_CHECK_SMOKE:-0}"
OUT_DIR="${1:-${GPU_CHECK_OUT:-$ROOT/bench/out/gpu_check}}"
BUDGET_S="${GPU_CHECK_BUDGET_S:-540}"
[[ "$SMOKE" == 1 ]] && BUDGET_S="${GPU_CHECK_BUDGET_S:-1200}" # a loaded CPU is slow even at tiny sizes
START=$SECONDS

fail() { echo "gpu_check: $*" >&2; exit "${EXIT:-1}"; }

command -v "$PY" >/dev/null 2>&1 || EXIT=3 fail "no '$PY' on PATH: set PYTHON to the Python that has PyTorch."

# Python modules the program needs -> what pip installs for them.
declare -A WHEEL=([torch]=torch [torchvision]=torchvision [lightning]=lightning [jsonargparse]="jsonargparse[signatures]"
  [docstring_parser]="jsonargparse[signatures]" [typeshed_client]="jsonargparse[signatures]" [torchmetrics]=torchmetrics
  [tensorboard]=tensorboard [matplotlib]=matplotlib [PIL]=pillow [numpy]=numpy [yaml]=pyyaml)
missing_modules() {
  "$PY" - "${!WHEEL[@]}" <<'EOF' 2>/dev/null
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
EOF
}
MISSING="$(missing_modules)"
MISSING_BEFORE="$MISSING"

# No GPU: say so and start nothing (checked before anything is installed or written).
if [[ " $MISSING " != *" torch "* && "$SMOKE" != 1 ]]; then
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 ||
    EXIT=2 fail "no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False): nothing was run."
fi

if [[ -n "$MISSING" && -d "$ROOT/wheelhouse" ]]; then
  PACKAGES="$(for m in $MISSING; do echo "${WHEEL[$m]}"; done | sort -u | tr '\n' ' ')"
  # shellcheck disable=SC2086
  PIP_SAID="$("$PY" -m pip install --quiet --no-index --find-links "$ROOT/wheelhouse" $PACKAGES 2>&1 | grep -v '^\s*$' | tail -1)"
  MISSING="$(missing_modules)"
fi
if [[ -n "$MISSING" ]]; then
  EXIT=3 fail "missing Python modules: $MISSING (no network: put their wheels in $ROOT/wheelhouse/ and run again)${PIP_SAID:+; pip: $PIP_SAID}."
fi
if [[ " $MISSING_BEFORE " == *" torch "* && "$SMOKE" != 1 ]]; then # torch came from the wheelhouse
  "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1 ||
    EXIT=2 fail "no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False): nothing was run."
fi

mkdir -p "$OUT_DIR" || EXIT=3 fail "cannot create $OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
WORK="${GPU_CHECK_WORK:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$WORK"
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
SECTIONS="$WORK/sections.tsv"
: >"$SECTIONS"

left() { echo $((BUDGET_S - (SECONDS - START))); }
# section NAME SECONDS_CAP command...: run it under a hard time limit, note its exit code and duration.
section() {
  local name="$1" cap="$2" began=$SECONDS rc
  shift 2
  echo
  echo "=== [$(((SECONDS - START) / 60))m$(((SECONDS - START) % 60))s] $name (at most ${cap}s; $(left)s of the budget left)"
  if ((cap < 5)); then
    echo "skipped: out of time"
    printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$SECTIONS"
    return
  fi
  timeout --signal=INT --kill-after=30 "$cap" "$@"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" $((SECONDS - began)) >>"$SECTIONS"
  echo "=== $name: exit $rc after $((SECONDS - began))s"
}

echo "gpu_check: $(date -u +%FT%TZ), commit $(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown), out $OUT_DIR, work $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
"$PY" -c "import sys, torch, lightning; print('python', sys.version.split()[0], 'torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"

DATA="$WORK/reproduce/data"
if [[ "$SMOKE" == 1 ]]; then
  SIZE=6000,100 # the benchmark's Lightning fit holds out 5,000 validation images and times 6 batches of 100
  # torch.compile is left off: on a CPU it takes minutes, and what it costs on a GPU is the GPU run's to measure.
  SHRINK=(--data.val_size=100 --data.batch_size=20 --data.eval_batch_size=50 --data.output_size=32 --trainer.max_epochs=2
    --trainer.limit_train_batches=2 --trainer.limit_val_batches=2 --trainer.limit_test_batches=2 --model.init_args.compile=false)
  REPRODUCE_EXTRA=(--accelerator cpu "--extra=${SHRINK[*]}")
  BENCH=(--device cpu --steps 2 --warmup 1 --fit-batches 6 --skip-compile)
  PROBE=(--device cpu --warmup 2 --steps 3 --profile-steps 2 --sync-steps 2)
  PROBE_SIZE=(--data.val_size=100 --data.batch_size=20 --model.init_args.compile=false)
  RESERVE=600
  SEED_FIT_S=100
  CAPS=(300 240 240)
else
  SIZE=50000,10000
  REPRODUCE_EXTRA=()
  BENCH=(--steps 30 --warmup 5 --fit-batches 80)
  PROBE=()
  PROBE_SIZE=()
  RESERVE=190 # seconds kept for sections 2 and 3 and the summary
  SEED_FIT_S=40 # each seed recipe's fit is stopped after this long
  CAPS=(75 45 60) # at most, seconds: throughput, probes-scratch, probes-fast
fi

# 1. Real wall time of each recipe. The seed's recipes (50 and 5 epochs) do not fit in the budget:
#    each fit is stopped after SEED_FIT_S, keeping its pace and the time all its epochs would take.
#    Then the modern recipes (fast ones first, then any others), to the end, within what is left.
SEED_CONFIGS=()
for name in finetune scratch; do
  [[ -f "configs/$name.yaml" ]] && SEED_CONFIGS+=("configs/$name.yaml")
done
MODERN_CONFIGS=()
for config in configs/fast.yaml configs/finetune_fast.yaml configs/*.yaml; do
  [[ -f "$config" && " ${SEED_CONFIGS[*]} ${MODERN_CONFIGS[*]} " != *" $config "* ]] && MODERN_CONFIGS+=("$config")
done
minutes() { "$PY" -c "print(max(0.0, $1 / 60))"; }
section reproduce-seed $((SEED_FIT_S * 3 + 60)) "$PY" bench/reproduce.py "${SEED_CONFIGS[@]}" --synthetic --synthetic-size "$SIZE" \
  --seeds 1 --max-minutes-per-fit "$(minutes "$SEED_FIT_S")" --max-minutes "$(minutes $((SEED_FIT_S * 3)))" \
  --work-dir "$WORK/reproduce" --out "$WORK/reproduce-seed" "${REPRODUCE_EXTRA[@]}" ${GPU_CHECK_SEED_EXTRA:+"--extra=$GPU_CHECK_SEED_EXTRA"}
if ((${#MODERN_CONFIGS[@]})); then
  section reproduce-modern $(($(left) - RESERVE + 30)) "$PY" bench/reproduce.py "${MODERN_CONFIGS[@]}" --synthetic \
    --synthetic-size "$SIZE" --seeds 1 --max-minutes "$(minutes $(($(left) - RESERVE)))" \
    --work-dir "$WORK/reproduce" --out "$WORK/reproduce-modern" "${REPRODUCE_EXTRA[@]}"
fi

# 2. Throughput of the bare train step, both networks, every precision/layout variant.
CAP=$(($(left) - 55))
((CAP > CAPS[0])) && CAP=${CAPS[0]}
section throughput "$CAP" "$PY" bench/benchmark.py --sections train --data-dir "$DATA" --out "$WORK/benchmark.json" "${BENCH[@]}"

# 3. Framework cost, GPU busy, host waits: the seed's net with the speed switches, then the fast recipe's own settings.
CAP=$(($(left) - 15))
((CAP > CAPS[1])) && CAP=${CAPS[1]}
section probes-scratch "$CAP" "$PY" bench/probes.py --config configs/scratch.yaml --data-dir "$DATA" --out "$WORK/probes-scratch.json" \
  "${PROBE[@]}" -- --model.init_args.channels_last=true --data.data_on_device=true "${PROBE_SIZE[@]}"
if [[ -f configs/fast.yaml ]] && (($(left) > 45)); then
  CAP=$(($(left) - 15))
  ((CAP > CAPS[2])) && CAP=${CAPS[2]}
  section probes-fast "$CAP" "$PY" bench/probes.py --config configs/fast.yaml --data-dir "$DATA" --out "$WORK/probes-fast.json" \
    "${PROBE[@]}" -- "${PROBE_SIZE[@]}"
fi
# The same recipe with Lightning's eager step (cuda_graph false): what the captured step saves.
if [[ -f configs/fast.yaml ]] && (($(left) > 45)); then
  CAP=$(($(left) - 15))
  ((CAP > CAPS[2])) && CAP=${CAPS[2]}
  section probes-fast-eager "$CAP" "$PY" bench/probes.py --config configs/fast.yaml --data-dir "$DATA" \
    --out "$WORK/probes-fast-eager.json" "${PROBE[@]}" -- "${PROBE_SIZE[@]}" --model.init_args.cuda_graph=false
fi

echo
SMOKE_FLAG=()
[[ "$SMOKE" == 1 ]] && SMOKE_FLAG=(--smoke)
"$PY" bench/gpu_summary.py "$WORK" "$OUT_DIR" --seconds $((SECONDS - START)) "${SMOKE_FLAG[@]}"
FAILED="$(awk -F'\t' '$2 != "0" && $2 != "skipped" {printf " %s (exit %s)", $1, $2}' "$SECTIONS")"
echo "gpu_check: done in $((SECONDS - START))s; results in $OUT_DIR (summary.md, summary.json, reproduce.png, gpu_check.log)"
[[ -n "$FAILED" ]] && echo "gpu_check: sections that did not end cleanly:$FAILED (see summary.md)"
exec >&- 2>&-
wait # for tee to write the log's last lines
[[ -z "$FAILED" ]] || exit 4
