#!/usr/bin/env bash
# The GPU measurements behind benchmarks/RESULTS.md, most important first. Each step has its
# own time limit, so a failure or overrun in one leaves the others; after every step the
# result files so far are packed into DEST/results.tar and the log is in DEST/log.txt.
#
#   benchmarks/run_gpu.sh DEST [all|core|rest]  # from the repository root, on a CUDA machine
#
# all:  everything below in one go (about 13 minutes with every step at its limit).
# core: gated attention and training throughput at T=8192 and 1024 only (about 4 minutes).
# rest: what RESULTS.md still lacks: decoding, T=2048 and 32768 (about 10 minutes).
set -u
dest=${1:?usage: benchmarks/run_gpu.sh DEST [all|core|rest]}
mode=${2:-all}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
log=$dest/log.txt
res=benchmarks/results

step() {  # step LIMIT_S COMMAND...
  local limit=$1; shift
  echo "### $(date -u +%T) (limit ${limit}s) $*" | tee -a "$log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
  tar -C "$res" -cf "$dest/results.tar" --exclude='*_runs*' --exclude='*_tiny*' .
}

if [ "$mode" = core ]; then
  step 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  step 90 "$py" benchmarks/attention.py --seq_lens 8192 --segment_lens 2048,0 --rates 0.05,0.1,0.25,1.0 \
    --repeats 10 --out $res/attention_8192.json
  step 80 "$py" benchmarks/throughput.py --seq_lens 8192 --repeats 5 \
    --models tgn-hard-0.10,transformer --out $res/throughput_8192.json
  step 60 "$py" benchmarks/throughput.py --seq_lens 1024 --repeats 5 \
    --models tgn-hard-0.10,transformer --out $res/throughput_1024.json
  echo "### done $(date -u +%T)" | tee -a "$log"
  exit 0
fi

if [ "$mode" = rest ]; then
  step 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  step 120 "$py" benchmarks/decode.py --contexts 4096 --batches 1,16 --repeats 3 \
    --out $res/decode_4096.json
  step 200 "$py" benchmarks/decode.py --contexts 32768 --batches 1,16 --repeats 3 \
    --out $res/decode_32768.json
  step 120 "$py" benchmarks/attention.py --seq_lens 2048,32768 --segment_lens 2048,0 \
    --rates 0.05,0.1,0.25,1.0 --repeats 10 --out $res/attention_2048_32768.json
  step 120 "$py" benchmarks/throughput.py --seq_lens 32768 --remat --repeats 3 \
    --models tgn-hard-0.10,transformer,recurrent --out $res/throughput_32768.json
  echo "### done $(date -u +%T)" | tee -a "$log"
  exit 0
fi

step 30 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
step 60 "$py" -c "import jax, flax, optax, chex; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
step 110 "$py" benchmarks/attention.py --seq_lens 8192 --segment_lens 2048,0 --repeats 10 \
  --out $res/attention_8192.json
step 50 "$py" benchmarks/recurrence.py
step 80 "$py" -m pytest -m gpu -p no:xdist -p no:cacheprovider -o addopts="" -q tests
step 150 "$py" benchmarks/throughput.py --seq_lens 1024 --repeats 5 \
  --models tgn-hard-0.10,tgn-hard-0.25,transformer,recurrent,tgn-soft-gru --out $res/throughput_1024.json
step 100 "$py" benchmarks/throughput.py --seq_lens 8192 --repeats 5 \
  --models tgn-hard-0.10,transformer,recurrent --out $res/throughput_8192.json
step 100 "$py" benchmarks/decode.py --contexts 32768 --batches 1,16 --repeats 3 \
  --out $res/decode_32768.json
step 100 "$py" benchmarks/attention.py --seq_lens 2048,32768 --segment_lens 2048,0 --repeats 10 \
  --out $res/attention_2048_32768.json
echo "### done $(date -u +%T)" | tee -a "$log"
