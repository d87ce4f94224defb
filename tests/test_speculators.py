"""vLLM speculators' train.py flags and run.yaml (`--from-speculators`, or such a CONFIG): read and
checked the way speculators' own parser reads them, then estimated under runtime speculators
(docs/fit.md, "speculators jobs"; docs/estimate.md, "speculators runtime").

The expected readings are written out by hand from speculators' docs/cli/train.md and its schema:
default --total-seq-len 8192, --ttt-steps 3, aux layers [2, n//2, n-3], optimizer muon, DDP unless
--fsdp-shard, hidden states generated through vLLM unless --on-missing is not `generate`. The
expected bytes are hand calculations from speculators' source (what its trainer allocates), written
out below; none is read off fitplan's output. The runtime is not measured on a GPU.
"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import load_spec
from fitplan.errors import FitplanError
from fitplan.estimator import estimate_spec
from fitplan.speculators import npy_length, read
from fitplan.vllm_server import colocation

# docs/cli/train.md, "Multi-GPU (FSDP sharded)"
FSDP = ("torchrun --standalone --nproc_per_node=4 scripts/train.py --verifier-name-or-path "
        "meta-llama/Llama-3.1-8B-Instruct --data-path ./training_data --save-path ./checkpoints "
        "--draft-vocab-size 32000 --epochs 10 --fsdp-shard")

# the shape of speculators' examples/train/*_online_5k.sh: variables set in the script
ONLINE_SCRIPT = """\
#!/bin/bash
set -euo pipefail
MODEL="Qwen/Qwen3-8B"
OUTPUT_DIR="./output"
SEQ_LENGTH=16384
NUM_TRAIN_GPUS=2
# launch vLLM on its own GPUs first (scripts/launch_vllm.py), then train
CUDA_VISIBLE_DEVICES="2,3" torchrun \\
    --standalone --nproc_per_node "$NUM_TRAIN_GPUS" \\
    scripts/train.py \\
    --verifier-name-or-path "$MODEL" \\
    --data-path "$OUTPUT_DIR" \\
    --vllm-endpoint "http://localhost:8000/v1" \\
    --total-seq-len "$SEQ_LENGTH" \\
    --on-missing generate \\
    --on-generate delete
"""

# what speculators' artifacts.dump_yaml writes: the non-default values, groups under `train:`
RUN_YAML = """\
train:
  verifier:
    verifier_name_or_path: Qwen/Qwen3-8B
  draft:
    target_layer_ids: [1, 18, 33]
  data:
    total_seq_len: 4096
  generation:
    on_missing: raise
  loss:
    ttt_steps: 5
  optimizer:
    optimizer: adamw
  backend:
    hidden_states_path: ./hs
  not_a_group:
    x: 1
"""


def test_the_documented_fsdp_command_is_read():
    run = read(FSDP)
    assert run.values["model"] == "llama-3.1-8b"  # -Instruct has the base model's shapes
    assert run.gpus == "4xH100"  # torchrun's count, H100 assumed
    assert run.get("total_seq_len") == 8192 and run.get("ttt_steps") == 3
    assert run.get("draft_vocab_size") == 32000 and run.get("fsdp_shard") is True
    assert run.get("optimizer") == "muon" and run.get("on_missing") == "generate"
    assert run.values["target_layer_ids"] == [2, 16, 29]  # 32 layers: [2, 32 // 2, 32 - 3]


def test_a_script_with_variables_and_the_gpu_type_from_gpus(tmp_path):
    script = tmp_path / "online.sh"
    script.write_text(ONLINE_SCRIPT)
    run = read(str(script), {"gpus": "8xH200"})
    assert run.gpus == "2xH200"  # the launch's count, --gpus's type
    assert run.values["model"] == "qwen3-8b" and run.get("total_seq_len") == 16384
    assert run.values["target_layer_ids"] == [2, 18, 33]  # 36 layers
    assert "from vLLM" in run.describe()


def test_the_run_yaml_beside_the_checkpoints(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    run = read(str(path), {"gpus": "2xH100"})
    assert run.gpus == "2xH100"  # a run.yaml records no GPU count: --gpus gives both
    assert run.get("total_seq_len") == 4096 and run.get("ttt_steps") == 5
    assert run.get("optimizer") == "adamw" and run.get("hidden_states_path") == "./hs"
    assert run.values["target_layer_ids"] == [1, 18, 33]
    assert "from files" in run.describe()


def test_argparse_forms_prefixes_negations_lists_and_config(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  data:\n    total_seq_len: 2048\n  loss:\n    ttt_steps: 4\n")
    run = read(f"python scripts/train.py --verifier Qwen/Qwen3-8B --config {base} --ttt-steps=6 "
               "--target-layer-ids 3 17 30 --no-norm-output --seed -1")
    assert run.get("total_seq_len") == 2048  # from --config
    assert run.get("ttt_steps") == 6  # the flag over the file
    assert run.values["target_layer_ids"] == [3, 17, 30]
    assert run.get("norm_output") is False and run.get("seed") == -1
    # the flags alone (no launcher, no script): one GPU
    assert read("--verifier-name-or-path Qwen/Qwen3-8B --total-seq-len 4096").gpus == "1xH100"


# ---------------------------------------------------------------- the estimate, by hand

# Llama-3.2-1B: h 2048, 32 heads of 64, 8 KV heads, MLP 8192, vocabulary 128256, 16 layers.
SMALL = ("python scripts/train.py --verifier-name-or-path meta-llama/Llama-3.2-1B --total-seq-len 2048 "
         "--draft-vocab-size 32000 --optimizer adamw")
h, H, HKV, D, I, V, VD, T, L = 2048, 32, 8, 64, 8192, 128256, 32000, 2048, 3
FC = 3 * h * h  # 12,582,912
ATTENTION = 2 * h * (H + 2 * HKV) * D + H * D * h  # q, k, v read the 2h-wide input: 16,777,216
MLP = 3 * h * I  # 50,331,648
TRAINED = FC + ATTENTION + MLP + 4 * h  # four norms: 79,699,968 (the lm_head is frozen)
FROZEN = V * h + 2 * VD * h + h  # embedding, lm_head and verifier head [Vd, h], verifier norm: 393,742,336
MAPS = V * 1 + VD * 8  # t2d bool [V], d2t int64 [Vd]
WORKSPACE = 32 * 2**20  # cuBLAS workspace
PARAMS = 4 * (TRAINED + FROZEN) + MAPS  # fp32 master weights, frozen ones too: 1,894,153,472
GRADS = 4 * TRAINED  # fp32: 318,799,872
ADAMW = 8 * TRAINED  # exp_avg + exp_avg_sq fp32: 637,599,744
CASTS = 2 * TRAINED + 2 * VD * h  # autocast's bf16 weights + the frozen lm_head's bf16 cast: 290,471,936
BATCH = T * (2 * 3 * h + 2 * h + 3 * 8 + 1)  # aux [T, 3h] + last [T, h] bf16, 3 int64 ids, bool mask
TEACHER = 2 * T * VD  # the verifier head's bf16 logits [T, Vd]
# Saved per token and TTT step k (draft_terms, plain: SwiGLU keeps gate, silu, up, product):
# seven h-wide bf16 tensors, four fp32 norm rstds, roped q and o_proj input, 8I; flex attention:
# the keys and values of steps 0..k, its output and fp32 logsumexp.
LAYER = 7 * 2 * h + 4 * 4 + 4 * H * D + 8 * I  # 102,416
KERNEL = [4 * HKV * D * (k + 1) + 2 * H * D + 4 * H for k in range(L)]  # 6,272 / 8,320 / 10,368
ACTIVATIONS = sum(LAYER + KERNEL[k] for k in range(L)) * T + 2 * h * T + 2 * 2 * T * D  # + fc output, RoPE
LOGITS = (2 * VD + 5 * 4) * T * L  # the fused loss keeps each step's bf16 logits and 5 fp32 stats a row
LOSS_BACKWARD = 2 * (VD + h) * T  # the logits' bf16 gradient and the hidden's


def test_a_small_job_by_hand():
    est = estimate_spec(read(SMALL).spec())
    assert est.phases["load"] == {"draft.params": PARAMS, "runtime.workspace": WORKSPACE}
    forward = est.phases["draft_forward"]
    assert forward == {
        "draft.params": PARAMS + CASTS, "runtime.workspace": WORKSPACE, "optimizer.moments": ADAMW,
        "draft.grads": GRADS,  # last step's: zero_grad comes after the forward
        "target.outputs": BATCH, "logits.teacher": TEACHER, "activations.draft": ACTIVATIONS, "logits.draft": LOGITS,
    }
    assert ACTIVATIONS == 689_274_880 and LOGITS == 393_338_880
    assert sum(forward.values()) == 4_421_870_848 and est.peak_phase == "draft_forward"
    # backward peaks at its start: no grads yet, the loss's gradients on top of the saved set
    assert est.phase_allocated("backward") == PARAMS + WORKSPACE + ADAMW + BATCH + TEACHER + CASTS + ACTIVATIONS \
        + LOGITS + LOSS_BACKWARD == 4_242_531_584
    # AdamW's foreach step: the square roots of every second moment at once
    assert est.phase_allocated("optimizer_step") == PARAMS + WORKSPACE + ADAMW + GRADS + BATCH + 4 * TRAINED
    # one GPU's checkpoint: bf16 copies of the model state and of the optimizer state
    assert est.phase_allocated("checkpoint") == PARAMS + WORKSPACE + ADAMW + GRADS + 2 * (TRAINED + FROZEN) + ADAMW // 2
    # step 1: no moments and no grads of an earlier step
    assert est.phase_allocated("draft_forward", step1=True) == 4_421_870_848 - ADAMW - GRADS
    # outside the allocator: CUDA context 554,500,096 + first kernels 76 MiB + compiled kernels 142 MiB
    assert est.outside_allocator_bytes == 554_500_096 + (68 + 8 + 142) * 2**20


def test_fsdp2_and_muon_by_hand():
    est = estimate_spec(read(SMALL.replace("python", "torchrun --nproc_per_node 2").replace(" --optimizer adamw", "")
                             + " --fsdp-shard").spec())
    assert est.layout["world"] == 2
    forward = est.phases["draft_forward"]
    assert forward["draft.params"] == 4 * (TRAINED + FROZEN) // 2 + MAPS  # fp32 shards
    assert forward["draft.grads"] == GRADS // 2 and forward["optimizer.moments"] == 4 * TRAINED // 2  # Muon: 4 B
    root = FC + h + FROZEN  # fc, final norm and the frozen tensors stay gathered in bf16
    layer = ATTENTION + MLP + 3 * h  # the decoder layer while it runs
    assert forward["comm.buffers"] == 2 * (root + layer)
    assert "draft.params" not in est.phases["load"] or est.phases["load"]["draft.params"] == forward["draft.params"]
    # Muon's step, the gate matrix [8192, 2048]: fp32 update and two bf16 iterates, two 2048^2 bf16 Grams
    assert est.phases["optimizer_step"]["optimizer.grad_copy"] == 8 * I * h + 4 * h * h == 150_994_944
    # the checkpoint gathers one full fp32 tensor for the host: the embedding
    assert est.phases["checkpoint"]["comm.buffers"] == 4 * V * h


def test_ddp_keeps_buckets_as_large_as_the_grads():
    est = estimate_spec(read(SMALL.replace("python", "torchrun --nproc_per_node 2")).spec())
    assert est.phases["load"]["comm.buffers"] == GRADS  # DDP's fp32 buckets (gradient_as_bucket_view off)
    assert est.phases["load"]["draft.params"] == PARAMS  # replicated


# ---------------------------------------------------------------- a vLLM server on the same GPUs

COLOCATED = """\
#!/bin/bash
MODEL="meta-llama/Llama-3.2-1B"
python scripts/launch_vllm.py "$MODEL" -- --data-parallel-size 2 --gpu-memory-utilization {u} &
VLLM_PID=$!
cleanup() {{
    kill "$VLLM_PID"
}}
trap cleanup EXIT
CUDA_VISIBLE_DEVICES="0,1" torchrun --standalone --nproc_per_node 2 scripts/train.py \\
    --verifier-name-or-path "$MODEL" --total-seq-len 2048 --draft-vocab-size 32000
"""


def test_a_server_on_the_trainers_gpus_is_counted_beside_its_peak(tmp_path):
    script = tmp_path / "colocated.sh"
    script.write_text(COLOCATED.format(u=0.3))
    run = read(str(script), {"gpus": "8xH200"})
    assert run.server_fraction == 0.3  # the cleanup function's kill runs on exit, not before training
    assert any("stays up on GPUs 0,1" in w for w in run.warnings)
    alone = estimate_spec(run.spec().replace(vllm_gpu_memory_utilization=None))
    shared = estimate_spec(run.spec())
    total = shared.gpu_total_bytes
    assert shared.outside_allocator_bytes - alone.outside_allocator_bytes == int(0.3 * total)
    assert shared.peak_reserved_bytes == alone.peak_reserved_bytes + int(0.3 * total)
    assert any("0.3 x device + the trainer's peak <= device" in n for n in shared.notes)
    # the rule itself: the trainer needs alone.required_bytes; a server taking more than the rest OOMs
    over = (total - alone.required_bytes) / total + 0.01
    assert estimate_spec(run.spec().replace(vllm_gpu_memory_utilization=round(over, 4))).verdict == "OOM"
    script.write_text(COLOCATED.format(u=0.95))
    result = CliRunner().invoke(app, ["estimate", str(script), "--gpus", "2xH100"])
    assert result.exit_code == 0 and "OOM" in result.output  # 0.95 x 79 GiB leaves the trainer 4 GiB
    assert CliRunner().invoke(app, ["check", str(script)]).exit_code == 1  # the gate fails it


# H100 80 GB: total capacity 85,017,493,504 B as torch reports it (profiles/gpus, measured).
H100_TOTAL = 85_017_493_504


def test_the_vllm_share_has_a_key_of_its_own(tmp_path):
    """--vllm-gpu-memory-utilization states a server the launch does not show; the JSON config
    carries it under its own key, and sglang_mem_fraction stays SGLang's (unset)."""
    runner = CliRunner()
    alone = json.loads(runner.invoke(app, ["estimate", "--from-speculators", SMALL, "--json"]).stdout)
    result = runner.invoke(app, ["estimate", "--from-speculators", SMALL, "--vllm-gpu-memory-utilization", "0.3",
                                 "--json"])
    assert result.exit_code == 0, result.output
    shared = json.loads(result.stdout)
    assert shared["config"]["vllm_gpu_memory_utilization"] == 0.3 and shared["config"]["sglang_mem_fraction"] is None
    # 0.3 x 85,017,493,504 = 25,505,248,051.2 -> 25,505,248,051 B outside the trainer's allocator
    assert shared["outside_allocator_bytes"] - alone["outside_allocator_bytes"] == 25_505_248_051
    assert any("gpu_memory_utilization 0.3 x 79.18 GiB" in n for n in shared["notes"])


def test_a_plan_written_with_the_share_in_sglang_mem_fraction_still_loads(tmp_path):
    """Before the vLLM share had its own key, a speculators plan (fit -o) held it in
    sglang_mem_fraction: it reads back as the vLLM server's share."""
    spec = read(SMALL).spec(overrides={"vllm_gpu_memory_utilization": 0.3})
    # the key did not exist then: the share sat in sglang_mem_fraction
    config = {**{k: v for k, v in spec.to_dict().items() if k != "vllm_gpu_memory_utilization"},
              "sglang_mem_fraction": 0.3}
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"fitplan_plan": 1, "config": config, "prediction": {}, "trail": []}))
    loaded = load_spec(plan)
    assert loaded == spec and loaded.sglang_mem_fraction is None


@pytest.mark.parametrize("script,fraction,words", [
    # speculators' online example: vLLM on 0,1, training on 2,3
    (('VLLM_GPUS="0,1"\nCUDA_VISIBLE_DEVICES="$VLLM_GPUS" python scripts/launch_vllm.py M -- --port 8000 &\n'
      'CUDA_VISIBLE_DEVICES="2,3" torchrun scripts/train.py --verifier-name-or-path M'), None, "outside this estimate"),
    # its offline example: the server is killed before training
    ('python scripts/launch_vllm.py M &\nPID=$!\nkill "$PID"\ntorchrun scripts/train.py --verifier-name-or-path M',
     None, "stopped first"),
    # nobody sets CUDA_VISIBLE_DEVICES: both see every GPU; vLLM's default utilization
    ("vllm serve M &\ntorchrun scripts/train.py --verifier-name-or-path M", 0.9, "(vLLM default)"),
    (("export CUDA_VISIBLE_DEVICES=0,1,2,3\npython scripts/launch_vllm.py M -- --gpu-memory-utilization=0.4 &\n"
      "CUDA_VISIBLE_DEVICES=3 python scripts/train.py --verifier-name-or-path M"), 0.4, "GPU 3"),
    ('CUDA_VISIBLE_DEVICES="$X" vllm serve M &\npython scripts/train.py --verifier-name-or-path M', None, "$X"),
    ("python scripts/train.py --verifier-name-or-path M", None, None),
])
def test_where_the_server_runs(script, fraction, words):
    from fitplan.shell_vars import expand_script

    found, line = colocation(expand_script(script))
    assert found == fraction
    assert (line is None) if words is None else (words in line), line


def test_a_bad_utilization_is_one_line(tmp_path):
    script = tmp_path / "bad.sh"
    script.write_text(COLOCATED.format(u="1.5"))
    result = CliRunner().invoke(app, ["estimate", str(script)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "--gpu-memory-utilization '1.5'" in result.output and "(0, 1)" in result.output


# ---------------------------------------------------------------- every command answers


def test_every_command_answers_a_speculators_job(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    script = tmp_path / "train.sh"
    script.write_text(FSDP + "\n")
    log = tmp_path / "oom.log"
    log.write_text("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total "
                   "capacity of 79.19 GiB of which 1.20 GiB is free. Including non-PyTorch memory, this process has "
                   "77.98 GiB memory in use. Of the allocated memory 74.10 GiB is allocated by PyTorch, and 2.37 GiB "
                   "is reserved by PyTorch but unallocated.")
    runner = CliRunner()
    for args in (["estimate", "--from-speculators", FSDP], ["estimate", "--from-speculators", FSDP, "--json"],
                 ["fit", "--from-speculators", FSDP], ["explain", str(log), "--from-speculators", FSDP],
                 ["estimate", str(path), "--gpus", "2xH100"], ["check", str(path), str(script)],
                 ["fit", str(path)], ["diff", str(path), str(script)], ["estimate", str(script)]):
        result = runner.invoke(app, args)
        assert result.exit_code in (0, 1), (args, result.output)
        assert "Traceback" not in result.output and result.output.strip(), args
    assert load_spec(path).runtime == "speculators"


def test_ignored_flags_are_listed_once():
    run = read(FSDP)
    ignored = [w for w in run.warnings if "ignored" in w]
    assert ignored == ["speculators flags fitplan does not model (ignored): --epochs, --save-path"]


def test_the_draft_vocabulary_of_a_local_mapping(tmp_path):
    header = "{'descr': '<i8', 'fortran_order': False, 'shape': (24000,), }"
    header += " " * (63 - len(header)) + "\n"  # padded so magic + sizes + header is 64 bytes
    (tmp_path / "d2t.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode())
    assert npy_length(tmp_path / "d2t.npy") == 24000
    run = read(f"python scripts/train.py --verifier-name-or-path Qwen/Qwen3-8B --data-path {tmp_path}")
    assert run.spec().draft == "speculators:24000"
    with pytest.raises(FitplanError, match="does not match"):
        read(f"python scripts/train.py --verifier-name-or-path Qwen/Qwen3-8B --data-path {tmp_path} "
             "--draft-vocab-size 32000")
    assert read("python scripts/train.py --verifier-name-or-path Qwen/Qwen3-8B").spec().draft == "speculators"


def test_one_source_at_a_time(tmp_path):
    result = CliRunner().invoke(app, ["estimate", "--from-speculators", FSDP, "--from-specforge", "x"])
    assert result.exit_code == 2
    assert "give one of a CONFIG file, --from-specforge or --from-speculators" in result.output


def test_a_fitplan_config_is_not_taken_for_speculators(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("model: qwen3-8b\n# trained before with --verifier-name-or-path Qwen/Qwen3-8B\n")
    assert load_spec(config).model == "qwen3-8b"
