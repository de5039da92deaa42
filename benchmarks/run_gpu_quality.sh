#!/usr/bin/env bash
# The quality grids sized for a GPU (more than one 10-minute device session: each command
# resumes the runs already finished in benchmarks/results/*_runs, so it can be run again
# until done). The log is DEST/log.txt; result files are packed into DEST/results.tar.
#
#   bash benchmarks/run_gpu_quality.sh DEST [LIMIT_S]     # from the repository root
set -u
dest=${1:?usage: bash benchmarks/run_gpu_quality.sh DEST [LIMIT_S]}
limit=${2:-560}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
res=benchmarks/results
# The Zoology grid with zero fillers, V = 8192: TGN (with its oracle and random gates at the
# learned rates), Transformer and pure recurrence; d_model 64 and 128; best of four
# learning rates; 4000 steps of 64 sequences (0.4% of Zoology's 100k x 64 epochs).
timeout -k 5 "$limit" "$py" benchmarks/mqar.py --fillers zero --gates learned,oracle,random \
  --models tgn,transformer,recurrent --out $res/mqar_zoology_zero.json 2>&1 | tee -a "$dest/log.txt"
tar -C "$res" -cf "$dest/results.tar" --exclude='*_runs*' --exclude='*_tiny*' .
# Accuracy against open rate with random fillers at (128, 16), V = 256, d_model 64, 3000 steps
# of 64 (the budget at which the TGN reached 0.96 on CPU): the learned gate at five targets,
# the random gate at each learned run's per-layer rates, the oracle once.
for target in 0.1 0.15 0.2 0.25 0.3; do
  gates=learned,random
  [ "$target" = 0.25 ] && gates=learned,oracle,random
  timeout -k 5 "$limit" "$py" benchmarks/mqar.py --grid 128:16 --vocab_size 256 --d_models 64 \
    --lrs 0.003 --steps 3000 --target_rate "$target" --models tgn --gates "$gates" \
    --fillers random --out "$res/mqar_curve128_random_$target.json" 2>&1 | tee -a "$dest/log.txt"
done
tar -C "$res" -cf "$dest/results.tar" --exclude='*_runs*' --exclude='*_tiny*' .
