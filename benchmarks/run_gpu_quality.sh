#!/usr/bin/env bash
# The quality grids sized for a GPU. The models are small (2 layers, d_model <= 128), so one
# training process leaves most of a GPU idle: the runs go to JOBS processes at once, most
# important first, all sharing the GPU. At LIMIT_S the unfinished runs stop, within 30 s
# (the same command resumes them from their checkpoints; finished runs are reused; a run
# stopped before its first checkpoint starts again), then each table
# is collected from the finished runs alone (`mqar.py --collect` lists the missing ones).
# The log is DEST/log.txt; tables, plots and the runs' metrics (no checkpoints) are packed
# into DEST/results.tar. On an H100 with 14 jobs at once a run takes 170-320 s (about 20
# steps/s each), so the whole queue (117 runs) needs about 32 minutes: several calls, each
# going on where the last stopped (the runs directories must survive between them).
#
#   bash benchmarks/run_gpu_quality.sh DEST [LIMIT_S] [JOBS]     # from the repository root
#
# MQAR_OPTIONS (say "--steps 20 --eval_examples 64") is added to every mqar.py command: a
# smoke test of the whole script on a CPU, writing under DEST/results instead of
# benchmarks/results.
set -u
dest=${1:?usage: bash benchmarks/run_gpu_quality.sh DEST [LIMIT_S] [JOBS]}
limit=${2:-450}
jobs=${3:-14}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # many processes share one GPU
# Runs that differ only in what the compiled programs take as data (the eval step across
# learning rates and gates, say) compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/tgn_jax_compilation_cache}
py=${PYTHON:-python3}
log=$dest/log.txt
res=benchmarks/results
[ -n "${MQAR_OPTIONS:-}" ] && res=$dest/results
mkdir -p "$res"
mqar() { $py benchmarks/mqar.py "$@" ${MQAR_OPTIONS:-}; }

# The Zoology grid with zero fillers, V = 8192: TGN at 1.25x the oracle's open rate,
# Transformer and pure recurrence; d_model 64 and 128; the best of the learning rates
# that finished (3e-3 and 1e-3 first); 4000 steps of 64 sequences (4% of Zoology's
# 100k examples x 64 epochs).
zoology_grid="64:4 128:8 256:16 512:64"
zoology="--fillers zero --vocab_size 8192 --steps 4000 --target_vs_oracle 1.25 \
  --runs_dir $res/mqar_zoology_runs"
# Accuracy against open rate with random fillers at (128, 16), V = 256, d_model 64, 3000
# steps of 64: the learned gate at five targets, the random gate at each learned run's
# per-layer rates, the oracle once.
curve_targets="0.25 0.1 0.15 0.2 0.3"
curve_gates() { [ "$1" = 0.25 ] && echo learned,oracle,random || echo learned,random; }
curve="--grid 128:16 --vocab_size 256 --d_models 64 --lrs 0.003 --steps 3000 --models tgn \
  --fillers random --runs_dir $res/mqar_curve128_runs"
# The open-rate control begun at step 100 (not 1333) at every grid point, TGN d_model 64,
# LR 3e-3: on CPU at (128, 8) the TGN leaves the Transformer's plateau within 100-200 steps
# of its open rate reaching the target, whenever that is.
early="--lam_warmup 100 --d_models 64 --lrs 0.003 --models tgn"
# The same with the open budget held otherwise (--quantile_scope): "last", all of it in the
# last layer, the first held shut (on CPU at (128, 8) each drop of the early-control run
# came when the pooled threshold let layer 1 open some of its queries); "sticky", pooled,
# but a layer left empty for hundreds of steps drawn shut; "sticky_rateend", the same with
# the threshold's step fraction falling to 0.05 by the end (on CPU: at (128, 8) it kept
# the final open rate from jumping to 1.40x the oracle's; at (64, 4) 0.9822 and 0.9975 on
# two seeds, against 0.9922 and 0.998 without it). Each has its own table,
# mqar_zoology_zero_lamwarmup100_SCOPE.json.
early_scopes="last sticky sticky_rateend"
scope_options() {
  case $1 in
    sticky_rateend) echo "--quantile_scope sticky --quantile_rate_end 0.05" ;;
    *) echo "--quantile_scope $1" ;;
  esac
}

work=$(mktemp -d)  # the queue, each job's log and its (unread) partial table
mkdir -p "$work/logs"
{
  for target in $curve_targets; do
    echo "$curve --target_rate $target --gates $(curve_gates "$target")"
  done
  for lr in 0.003 0.001 0.0003 0.0001; do
    for point in $zoology_grid; do
      for d_model in 64 128; do
        for model in tgn transformer recurrent; do
          echo "$zoology --grid $point --d_models $d_model --lrs $lr --models $model"
        done
      done
    done
    if [ "$lr" = 0.003 ]; then
      for point in $zoology_grid; do
        echo "$zoology $early --grid $point"
        for scope in $early_scopes; do
          echo "$zoology $early $(scope_options "$scope") --grid $point"
        done
      done
    fi
  done
} | nl -w3 -nrz -s' ' >"$work/queue.txt"

# Each job stops at the deadline (SIGTERM: its run saves a checkpoint; SIGKILL 30 s later);
# a job not started by then is skipped, so xargs returns only when every process is gone.
deadline=$(($(date +%s) + limit))
job() {  # job INDEX MQAR_OPTIONS...
  local index=$1 left=$((deadline - $(date +%s)))
  shift
  [ "$left" -gt 0 ] || return 0
  # python is timeout's own child, so the job ends only when its training process has.
  timeout -k 30 "$left" $py benchmarks/mqar.py "$@" ${MQAR_OPTIONS:-} \
    --out "$work/part$index.json" >"$work/logs/job$index.log" 2>&1 ||
    echo "job $index failed or was stopped: $*"
}
export -f job
export py work deadline MQAR_OPTIONS
echo "### $(date -u +%T) $(wc -l <"$work/queue.txt") jobs, $jobs at a time, limit ${limit}s" |
  tee -a "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
xargs -P "$jobs" -L 1 bash -c 'job "$@"' _ <"$work/queue.txt" 2>&1 | tee -a "$log"
echo "### $(date -u +%T) training stopped (exit ${PIPESTATUS[0]}); collecting" | tee -a "$log"

mqar $curve --target_rate "$(echo $curve_targets | tr ' ' ,)" --gates learned,oracle,random \
  --collect --out "$res/mqar_curve128_random.json" >>"$log" 2>&1 &
mqar $zoology $early --grid "$(echo $zoology_grid | tr ' ' ,)" --collect \
  --out "$res/mqar_zoology_zero_lamwarmup100.json" >>"$log" 2>&1 &
for scope in $early_scopes; do
  mqar $zoology $early $(scope_options "$scope") --grid "$(echo $zoology_grid | tr ' ' ,)" \
    --collect --out "$res/mqar_zoology_zero_lamwarmup100_$scope.json" >>"$log" 2>&1 &
done
mqar $zoology --grid "$(echo $zoology_grid | tr ' ' ,)" --d_models 64,128 \
  --lrs 0.0001,0.0003,0.001,0.003 --collect --out "$res/mqar_zoology_zero.json" 2>&1 | tee -a "$log"
wait
tail -n 40 "$log" | grep -E "^(model|  *tgn|  *transformer|  *recurrent|not finished)" || true
cp "$work/queue.txt" "$work/logs/"
tar -cf "$dest/results.tar" -C "$work" logs
made=$(cd "$res" && ls -d mqar_zoology_zero{,_lamwarmup100{,_last,_sticky,_sticky_rateend}}.* \
  mqar_curve128_random.* mqar_{zoology,curve128}_runs)
tar -rf "$dest/results.tar" --exclude=checkpoints -C "$res" $made
rm -rf "$work"
echo "### $(date -u +%T) done" | tee -a "$log"
