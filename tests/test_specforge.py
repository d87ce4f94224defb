"""SpecForge launch scripts read into the same job as the equivalent fitplan flags."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import RunSpec
from fitplan.errors import FitplanError
from fitplan.estimator import estimate_spec
from fitplan.specforge import flag_changes, parse_command

SCRIPT = r"""#!/bin/bash
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT_DIR=$(dirname $SCRIPT_DIR)
# train eagle3 for llama3.1-8b
NUM_GPUS=${1:-8}
torchrun \
    --standalone \
    --nproc_per_node 8 \
    $ROOT_DIR/scripts/train_eagle3.py \
    --target-model-path meta-llama/Llama-3.1-8B-Instruct \
    --draft-model-config $ROOT_DIR/configs/llama3-8B-eagle3.json \
    --train-data-path $ROOT_DIR/cache/dataset/sharegpt.jsonl \
    --output-dir $ROOT_DIR/outputs/llama3-8b-eagle3 \
    --num-epochs 10 \
    --batch-size 1 \
    --learning-rate 1e-4 \
    --max-length 4096 \
    --chat-template llama3 \
    --cache-dir $ROOT_DIR/cache \
    --tp-size 8 \
    --attention-backend flex_attention \
    --some-new-flag 3
"""

EQUIVALENT = RunSpec(
    model="llama-3.1-8b", draft="llama3-8b", gpus="8xH100", runtime="specforge", target_backend="sglang",
    tp=8, micro_batch=1, seq=4096, ttt=7, accum=1, attention="flex", sharding="zero2", precision="bf16-master",
)


def test_script_round_trips_to_the_same_estimate_as_the_flags():
    command = parse_command(SCRIPT)
    assert command.spec() == EQUIVALENT
    assert estimate_spec(command.spec()).to_json() == estimate_spec(EQUIVALENT).to_json()


def test_unknown_flags_are_reported_and_ignored():
    assert parse_command(SCRIPT).warnings == ("SpecForge flag --some-new-flag is not modelled; ignored",)


def test_script_from_a_file_with_equals_flags_and_two_nodes(tmp_path):
    path = tmp_path / "run.sh"
    path.write_text(
        "torchrun --nnodes=2 --nproc-per-node=8 scripts/train_eagle3.py --target-model-path openai/gpt-oss-120b "
        "--tp-size=8 --batch-size=2 --max-length=8192 --shard-target-output --draft-accumulation-steps 4 "
        "--attention-backend fa --target-model-backend hf --ttt-length 6\n"
    )
    spec = parse_command(str(path)).spec()
    assert (spec.model, spec.gpus, spec.tp, spec.micro_batch, spec.seq) == ("gpt-oss-120b", "2x8xH100", 8, 2, 8192)
    assert (spec.output_sharding, spec.accum, spec.attention, spec.target_backend, spec.ttt) == (
        "all-to-all", 4, "sdpa", "hf", 6)


def test_fitplan_flags_override_the_command_line():
    spec = parse_command(SCRIPT).spec({"gpus": "8xH200", "seq": 2048})
    assert (spec.gpus, spec.seq) == ("8xH200", 2048)


@pytest.mark.parametrize("text, named", [
    ("torchrun scripts/train_eagle3.py --target-model-path /nowhere/my-model --tp-size 1", "/nowhere/my-model"),
    ("torchrun scripts/train_eagle3.py --target-model-path Qwen/Qwen3-8B --draft-model-config x/mine.json", "x/mine.json"),
    ("torchrun scripts/train_eagle3.py --target-model-path Qwen/Qwen3-8B --attention-backend xformers", "xformers"),
    ("torchrun scripts/train_eagle3.py --target-model-path Qwen/Qwen3-8B --batch-size two", "two"),
    ("python train.py --lr 1", "train_eagle3"),
])
def test_bad_command_lines_name_the_problem(text, named):
    with pytest.raises(FitplanError, match=named.replace("/", ".")):
        parse_command(text)


def test_cli_bad_specforge_path_is_one_line_exit_2():
    result = CliRunner().invoke(app, ["fit", "--from-specforge",
                                      "torchrun scripts/train_eagle3.py --target-model-path /nowhere/m"])
    assert result.exit_code == 2
    assert "/nowhere/m" in result.output and "Traceback" not in result.output


def test_fit_answers_with_specforge_flags():
    # Qwen3-8B (V = 151936) at tp 8, B = 1, S = 8192 with the gather cascade: 12·T_g·V bytes with
    # T_g = 8·8192 is 12 x 65536 x 151936 B = 111 GiB of logits alone (docs/estimate.md), more
    # than an H100; sharding the output divides it by tp = 8.
    text = ("torchrun --nproc_per_node 8 scripts/train_eagle3.py --target-model-path Qwen/Qwen3-8B "
            "--tp-size 8 --batch-size 1 --max-length 8192")
    result = CliRunner().invoke(app, ["fit", "--from-specforge", text])
    assert result.exit_code == 0, result.output
    assert "add --shard-target-output" in result.output


def test_flag_changes_name_specforge_flags():
    after = EQUIVALENT.replace(micro_batch=1, accum=4, output_sharding="all-to-all", expandable_segments=True)
    assert flag_changes(EQUIVALENT.replace(accum=2), after) == [
        "set --draft-accumulation-steps 4",
        "add --shard-target-output",
        "launch with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
    ]


# ---------------------------------------------------------------- launch scripts with variables

VARIABLES_SCRIPT = """#!/bin/bash
SCRIPT_DIR=$( cd -- "$( dirname -- "${BASH_SOURCE[0]}" )" &> /dev/null && pwd )
ROOT_DIR=$(dirname $SCRIPT_DIR)
NUM_GPUS=${1:-8}
TP_SIZE=${2:-2}
export MAX_LEN="8192"
torchrun \\
    --standalone \\
    --nproc_per_node $NUM_GPUS \\
    $ROOT_DIR/scripts/train_eagle3.py \\
    --target-model-path meta-llama/Llama-3.1-8B-Instruct \\
    --draft-model-config $ROOT_DIR/configs/llama3-8B-eagle3.json \\
    --train-data-path $ROOT_DIR/cache/dataset/sharegpt_train.jsonl \\
    --batch-size ${BATCH:-2} \\
    --tp-size $TP_SIZE \\
    --max-length ${MAX_LEN}
"""


def test_script_variables_expand_from_the_scripts_own_assignments(tmp_path):
    path = tmp_path / "run.sh"
    path.write_text(VARIABLES_SCRIPT)
    spec = parse_command(str(path)).spec()
    # ${1:-8} -> 8 GPUs; ${2:-2} -> tp 2; ${BATCH:-2} (unset) -> 2; "${MAX_LEN}" quoted -> 8192;
    # the draft config under $ROOT_DIR (set from a command) still names its profile by file name
    assert (spec.gpus, spec.tp, spec.micro_batch, spec.seq) == ("8xH100", 2, 2, 8192)
    assert (spec.model, spec.draft) == ("llama-3.1-8b", "llama3-8b")


def test_a_variable_the_script_does_not_set_is_named_with_the_flag_to_pass(tmp_path):
    path = tmp_path / "run.sh"
    path.write_text(VARIABLES_SCRIPT.replace("NUM_GPUS=${1:-8}", "NUM_GPUS=$(nvidia-smi -L | wc -l)"))
    with pytest.raises(FitplanError, match=r"--nproc_per_node uses \$NUM_GPUS.*pass --gpus COUNTxTYPE"):
        parse_command(str(path)).spec()
    assert parse_command(str(path)).spec({"gpus": "4xH100"}).gpus == "4xH100"  # the flag gives it
    path.write_text(VARIABLES_SCRIPT.replace("--batch-size ${BATCH:-2}", "--batch-size $BATCH"))
    with pytest.raises(FitplanError, match=r"--batch-size uses \$BATCH.*pass --micro-batch"):
        parse_command(str(path)).spec()


def test_a_script_reads_alike_in_every_command(tmp_path):
    """Positional CONFIG and --from-specforge, in estimate, fit, check and explain: one job."""
    path = tmp_path / "run.sh"
    path.write_text(VARIABLES_SCRIPT)
    runner = CliRunner()
    peaks = set()
    for args in (["estimate", str(path), "--json"], ["estimate", "--from-specforge", str(path), "--json"],
                 ["fit", str(path), "--json"], ["fit", "--from-specforge", str(path), "--json"]):
        result = runner.invoke(app, args)
        assert result.exit_code in (0, 1), result.output
        peaks.add(json.loads(result.stdout)["peak_reserved_bytes"] if args[0] == "estimate"
                  else json.loads(result.stdout)["trail"][0]["peak_reserved_bytes"])
    assert len(peaks) == 1
    check = runner.invoke(app, ["check", str(path), "--format", "json"])
    assert json.loads(check.stdout)["rows"][0]["peak_reserved_bytes"] in peaks
