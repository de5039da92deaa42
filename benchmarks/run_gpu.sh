#!/usr/bin/env bash
# The GPU measurements behind benchmarks/RESULTS.md, most important first, in under 10
# minutes. Each step has its own time limit, so a failure or overrun in one leaves the
# others, and the speed benchmarks write their file after every row, so a step stopped by
# its limit keeps what it measured. After every step the result files so far are packed
# into DEST/results.tar; the log is DEST/log.txt.
#
#   bash benchmarks/run_gpu.sh DEST          # from the repository root, on a CUDA machine
set -u
dest=${1:?usage: bash benchmarks/run_gpu.sh DEST}
mkdir -p "$dest"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
log=$dest/log.txt
res=benchmarks/results
mkdir -p "$res"

step() {  # step LIMIT_S COMMAND...
  local limit=$1; shift
  echo "### $(date -u +%T) (limit ${limit}s) $*" | tee -a "$log"
  timeout -k 5 "$limit" "$@" 2>&1 | tee -a "$log"
  echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
  tar -C "$res" -cf "$dest/results.tar" --exclude='*_runs*' --exclude='*_tiny*' .
}
models="tgn-hard-0.10,tgn-kvopen-0.10,transformer,plain-gpt"

# Limits: 20 + 35 + 45 + 90 + 80 + 60 + 80 + 80 + 40 + 40 + 30 = 600 s at most.
step 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
  $py -c \"import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())\""
# Correctness on the GPU first: cuDNN == XLA, routed == dense in bf16 with cuDNN, and the
# Pallas kernel compiled by Triton == XLA and the float64 reference.
step 35 "$py" -m pytest -m gpu -p no:xdist -p no:cacheprovider -o addopts="" -q tests
step 45 "$py" -m pytest -p no:xdist -p no:cacheprovider -o addopts="" -q tests/test_flash.py
# Training throughput, 12L/768d, B*T = 16384, open rate held at 0.10; at T=1024 each
# library model also through train.py's sharded step on a one-device mesh.
step 90 "$py" benchmarks/throughput.py --seq_lens 1024 --repeats 5 --mesh data:1 \
  --models tgn-hard-0.10,transformer,plain-gpt,recurrent --out $res/throughput_1024.json
step 80 "$py" benchmarks/throughput.py --seq_lens 8192 --repeats 5 \
  --models $models,recurrent --out $res/throughput_8192.json
step 60 "$py" benchmarks/throughput.py --seq_lens 8192 --repeats 5 --attention_impl pallas \
  --models tgn-hard-0.10,tgn-kvopen-0.10 --out $res/throughput_8192_pallas.json
step 80 "$py" benchmarks/throughput.py --seq_lens 32768 --repeats 3 --remat \
  --models $models --out $res/throughput_32768.json
# Decoding at 32k and 4k contexts, batch 16 and 1 (tokens/s and cache bytes); then the
# decode route: cuDNN's key lengths (above) against the Pallas kernel's, at 32k and 16 rows.
step 80 "$py" benchmarks/decode.py --contexts 32768,4096 --batches 16,1 --steps 128 --repeats 3 \
  --out $res/decode.json
step 40 "$py" benchmarks/decode.py --contexts 32768 --batches 16 --steps 128 --repeats 3 \
  --attention_impl pallas --models tgn-hard-0.10,tgn-kvopen-0.10 --out $res/decode_pallas.json
# The gated attention op against dense cuDNN: cuDNN with the position mask as a bias vs
# the Pallas kernel, side by side.
step 40 "$py" benchmarks/attention.py --seq_lens 8192 --segment_lens 0 --impls cudnn,pallas \
  --rates 0.05,0.1,0.25,1.0 --repeats 10 --out $res/attention_8192.json
step 30 "$py" benchmarks/attention.py --seq_lens 2048,32768 --segment_lens 0 --impls cudnn,pallas \
  --rates 0.1,1.0 --repeats 10 --out $res/attention_2048_32768.json
echo "### done $(date -u +%T)" | tee -a "$log"
