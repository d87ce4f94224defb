"""vLLM speculators' train.py flags and run.yaml (`--from-speculators`, or such a CONFIG): read and
checked the way speculators' own parser reads them, then refused in one line, because its trainer
is not modelled (docs/fit.md, "speculators jobs").

The expected readings are written out by hand from speculators' docs/cli/train.md and its schema:
default --total-seq-len 8192, --ttt-steps 3, aux layers [2, n//2, n-3], optimizer muon, DDP unless
--fsdp-shard, hidden states generated through vLLM unless --on-missing is not `generate`.
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import load_spec
from fitplan.errors import FitplanError
from fitplan.speculators import read

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


@pytest.mark.parametrize("command,words", [
    ("--verifier-name-or-path Qwen/Qwen3-8B --bogus 3 --lr-x", ["unknown flags --bogus, --lr-x"]),
    ("--verifier-name-or-path Qwen/Qwen3-8B --total-seq-len abc", ["--total-seq-len must be an integer"]),
    ("--verifier-name-or-path Qwen/Qwen3-8B --optimizer sgd", ["--optimizer", "'sgd' is not one of: adamw, muon"]),
    ("--verifier-name-or-path Qwen/Qwen3-8B --fsdp-shard=yes", ["--fsdp-shard takes no value"]),
    ("--verifier-name-or-path Qwen/Qwen3-8B stray", ["unexpected argument 'stray'"]),
    ("--verifier-name-or-path Qwen/Qwen3-8B --ttt-steps", ["--ttt-steps needs a value"]),
    ("--verifier-name-or-path Qwen/Qwen3-8B --ttt-steps 0", ["--ttt-steps must be a positive integer"]),
    ("--verifier-name-or-path Qwen/Qwen3-8B --speculator-type dflash", ["dflash", "EAGLE3 drafts only"]),
    ("--verifier-name-or-path Qwen/Qwen3-8B --speculator-type medusa", ["'medusa' is not one of", "eagle3, dflash"]),
    ("--verifier-name-or-path no-such/model-7b", ["--verifier-name-or-path 'no-such/model-7b' resolves to no"]),
    ("--data-path ./d", ["--verifier-name-or-path is missing"]),
    ("--no-norm", ["--no-norm is ambiguous"]),
])
def test_bad_commands_name_the_flag(command, words):
    with pytest.raises(FitplanError) as exc:
        read(f"python scripts/train.py {command}")
    for word in words:
        assert word in str(exc.value)


def test_every_command_refuses_the_job_in_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(RUN_YAML)
    runner = CliRunner()
    for args in (["estimate", "--from-speculators", FSDP], ["fit", "--from-speculators", FSDP],
                 ["estimate", str(path)], ["check", str(path)], ["fit", str(path)],
                 ["diff", str(path), str(path)]):
        result = runner.invoke(app, args)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 2, (args, result.output)
        assert len(lines) == 1 and lines[0].startswith("error: speculators job read ("), result.output
        assert "not estimated" in lines[0] and "Traceback" not in result.output
    with pytest.raises(FitplanError, match="not modelled by fitplan yet"):
        load_spec(path)


def test_one_source_at_a_time(tmp_path):
    result = CliRunner().invoke(app, ["estimate", "--from-speculators", FSDP, "--from-specforge", "x"])
    assert result.exit_code == 2
    assert "give one of a CONFIG file, --from-specforge or --from-speculators" in result.output


def test_a_fitplan_config_is_not_taken_for_speculators(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("model: qwen3-8b\n# trained before with --verifier-name-or-path Qwen/Qwen3-8B\n")
    assert load_spec(config).model == "qwen3-8b"
