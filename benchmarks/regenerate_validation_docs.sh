#!/usr/bin/env bash
# Rebuild docs/validation-matrix.md, docs/validation.csv and docs/validation.png from the committed
# GPU results, re-predicted by the estimator as committed (no GPU needed). The caveats are the
# table's "Read first" lines: keep them true when rows are re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
fitplan validate --from-results tests/data/gpu/validation --trainer-reports tests/data/gpu --out docs/ \
 --caveat "Measured in two sessions: 1xH100 (5 trainer runs) and 1xH200 (13 matrix rows) in the first; 4xH200 in the second, where rows of every width shared the machine (fitplan validate --parallel: four 1-GPU or two 2-GPU rows side by side, each on its own GPUs). Raw rows: tests/data/gpu/validation/*rows*.jsonl." \
 --caveat "Before the trainer fix f6a6628 (the dense TTT mask built in every draft forward and recompute): every H100 eagle3 row and the 1xH200 eagle3 rows qwen3-8b s4k b4 and gpt-oss-20b (s8k ac, s4k b2, the two near-limit rows). Their re-runs were under way on 4xH200 when the session's device time ran out; those results are lost. The other eagle3 rows ran on the current trainer." \
 --caveat "Not blind: the reserve floor (fitplan/estimator/runtime.py reserve_floor_bytes: near the limit the allocator gives cached blocks back, so the verdict is decided by allocated + 2% + 256 MiB + memory outside the allocator) was added after these near-limit rows were measured. Before it, 4 of them had the wrong verdict (predicted OOM, ran); after, 1 (sft qwen3-8b b4 seq 8960: failed a 20.29 GiB request with 23.6 GiB cached in split segments, while seq 9984 ran; no estimator that grows with seq gets both)." \
 --caveat "Rows named *-as-run were measured as precision 'mixed' while trainer.sft_step ran 'mixed' as plain bf16 AdamW; they are compared as the bf16 job that ran (the recipe is fixed since). Near-limit rows carry their sequence in the name (-sN): N was chosen by the estimator of that time, by its device-level peak (near-limit rows are now placed by the required bytes, the verdict's measure). Rows spoiled by a previous row's hung workers holding GPU memory are set aside in tests/data/gpu/validation/h200x4_spoiled_rows.txt."
