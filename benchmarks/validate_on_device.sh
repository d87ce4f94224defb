#!/usr/bin/env bash
# Run validation-matrix rows on a lent GPU machine across several device-tool calls.
#
#   benchmarks/validate_on_device.sh start 'h200x4-*,h200x2-*'   # install, launch in the background, then poll
#   benchmarks/validate_on_device.sh poll                         # a later call: keep collecting
#
# The runner is started with setsid so it outlives one call (each call is limited to 10 minutes);
# every poll copies rows.jsonl, the runner's log and the row reports (tar) into $OUT, so what has
# finished comes back even if the machine is taken away. Rows share the GPUs (--parallel).
set -u
WORK=/tmp/validation
POLL_S=${POLL_S:-560}
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1

collect() {
    cp "$WORK/rows.jsonl" "$WORK/runner.log" "$OUT/" 2>/dev/null
    # reports and plans whole, the children's output as its last 200 lines: a hung rank's
    # warnings once made the tarball too large to come back (16 MiB a file)
    (cd "$WORK" && for f in runs/*/stdout.txt runs/*/stderr.txt; do
        [ -f "$f" ] && tail -n 200 "$f" > "$f.tail"; done
     find runs \( -name 'report*.json' -o -name plan.yaml -o -name '*.txt.tail' \) -print0 |
        tar czf "$OUT/reports.tgz" --null -T - 2>/dev/null)
    nvidia-smi --query-gpu=index,memory.used --format=csv,noheader > "$OUT/gpus.txt" 2>/dev/null
}

if [ "${1:-}" = start ]; then
    pip install --no-deps --no-build-isolation -e . -q 2>&1 | tail -2
    python -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count(), torch.cuda.get_device_name())"
    # first, alone on the GPUs (device-level readings are per GPU): flex with the written-down
    # TTT block mask against eager attention, values and gradients (FLEX_TEST=0 skips it)
    [ "${FLEX_TEST:-1}" = 1 ] &&
        timeout 150 python -m pytest -q -m gpu tests/test_trainer.py -k fused_kernels -p no:cacheprovider 2>&1 | tail -3
    mkdir -p "$WORK"
    setsid nohup python -m fitplan.validation.runner --parallel --timeout "${ROW_TIMEOUT_S:-240}" \
        --out "$WORK" --rows "$2" > "$WORK/runner.log" 2>&1 < /dev/null &
    sleep 5
fi
while [ "$SECONDS" -lt "$POLL_S" ] && pgrep -f fitplan.validation.runner > /dev/null; do
    sleep 10
    collect
done
collect
pgrep -f fitplan.validation.runner > /dev/null && echo "RUNNER STILL RUNNING" || echo "RUNNER DONE"
tail -n 60 "$WORK/runner.log"
