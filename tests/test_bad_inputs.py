"""Bad input, every reader: one line `error: ...` naming the problem and what is accepted, exit 2,
no traceback, and an answer in bounded time.

The CLI cases replay a bad-input campaign (huge --gpus counts, garbled OOM logs, impossible model
configs, result rows without a name, --plot paths, hostile YAML); the hypothesis properties fuzz the
readers themselves (RunSpec mappings and files, model configs, --gpus strings, OOM messages): each
call returns or raises FitplanError, within PER_CALL_SECONDS.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import CHOICES, FIELD_NAMES, RunSpec, load_spec, spec_from_mapping
from fitplan.errors import FitplanError
from fitplan.explain import parse_ooms
from fitplan.layout import resolve
from fitplan.profiles import MAX_DIM, MAX_GPUS_PER_NODE, MAX_NODES, Cluster, model_shape_from_config, parse_gpus
from fitplan.shapes import ModelShape, count_params

CLI_SECONDS = 5.0  # one CLI call, imports included; a hang is minutes
# one reader call on one fuzzed input: a guard against hangs (regex backtracking, arithmetic on
# huge numbers), not a speed target; a call takes milliseconds, but a loaded CI machine once
# paused one for 0.52 s
PER_CALL_SECONDS = 5.0
FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def one_line_refusal(args: list[str], *words: str) -> str:
    """Exit 2, exactly one line `error: ...` holding `words`, no traceback, in CLI_SECONDS."""
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    elapsed = time.perf_counter() - start
    assert result.exit_code == 2, (args, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert elapsed < CLI_SECONDS, (args, elapsed)
    return lines[0]


def runs(args: list[str]):
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    assert time.perf_counter() - start < CLI_SECONDS, args
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


# ----------------------------------------------------------------------------- --gpus

BAD_GPUS = [
    ("99999999999999999999xH100", "at most 1024"),
    ("99999999999x8xH100", "node count 99999999999 is out of range"),
    ("200000x8xH100", "at most 100000"),
    ("2x2048xH100", "GPUs per node 2048"),
    ("2048xH100", "NODESxCOUNTxTYPE for several nodes"),
    ("0xH100", "at least 1"),
    ("0x8xH100", "at least 1"),
    ("2x0xH100", "at least 1"),
    ("-1xH100", "at least 1"),
    ("8x", "no GPU type"),
    ("8", "no GPU type"),
    ("xH100", "no count before 'x'"),
    ("x", "no count before 'x'"),
    ("8xH100x2", "counts go before the GPU type"),
    ("8x8x8xH100", "more than two counts"),
    ("8xH1O0", "unknown GPU"),
    ("9" * 5000 + "xH100", "characters long"),
]


@pytest.mark.parametrize("gpus,words", BAD_GPUS)
def test_bad_gpus_are_one_line(gpus, words):
    line = one_line_refusal(["estimate", "--model", "llama-3.1-8b", "--gpus", gpus], words)
    assert "COUNTxTYPE" in line or "accepted" in line or "did you mean" in line or "known" in line


def test_bad_gpus_in_a_config_file_are_one_line_too(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("model: llama-3.1-8b\ngpus: 99999999999999999999xH100\n")
    one_line_refusal(["check", str(config)], "at most 1024")


def test_the_largest_accepted_cluster_is_answered_quickly():
    result = runs(["estimate", "--model", "llama-3.1-8b", "--gpus", f"{MAX_NODES}x{MAX_GPUS_PER_NODE}xH100"])
    assert result.exit_code in (0, 1), result.output


# ----------------------------------------------------------------------------- fitplan explain

NEW = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {req}. GPU 0 has a total capacity of {total} "
       "of which {free} is free. Including non-PyTorch memory, this process has {this} memory in use. Of the "
       "allocated memory {alloc} is allocated by PyTorch, and {cached} is reserved by PyTorch but unallocated.")
OLD = ("RuntimeError: CUDA out of memory. Tried to allocate {req} (GPU 0; {total} total capacity; {alloc} already "
       "allocated; {free} free; {reserved} reserved in total by PyTorch)")


def new_oom(req="2.00 GiB", total="79.18 GiB", free="1.12 GiB", this="78.05 GiB", alloc="60.02 GiB",
            cached="14.20 GiB") -> str:
    return NEW.format(req=req, total=total, free=free, this=this, alloc=alloc, cached=cached)


BAD_LOGS = [
    (new_oom(req="1.2.3 GiB"), ["unreadable size '1.2.3 GiB'", "expected a number"]),
    (new_oom(req="9" * 400 + " GiB"), ["impossible size", "up to 1 PiB"]),
    (new_oom(req="." + " GiB"), ["unreadable size"]),
    (new_oom(total="0 GiB", free="0 GiB"), ["impossible numbers", "total capacity of 0"]),
    (new_oom(free="90 GiB"), ["impossible numbers", "free of a 79.18 GiB total"]),
    (new_oom(this="900 GiB"), ["impossible numbers", "this process"]),
    (new_oom(alloc="70 GiB", cached="70 GiB"), ["impossible numbers", "reserved by PyTorch"]),
    (OLD.format(req="2 GiB", total="79 GiB", alloc="50 GiB", free="1 GiB", reserved="40 GiB"),
     ["impossible numbers", "allocated but only"]),
    (new_oom() + "\n" + new_oom(req="1.2.3 GiB"), ["OOM message 2 of 2"]),
    ("all good, no errors here\n", ["no CUDA out-of-memory message"]),
    ("", ["no CUDA out-of-memory message"]),
    ("RuntimeError: CUDA out of memory\n", ["not PyTorch's numbers"]),
    (new_oom().replace("GPU 0", "GPU " + "9" * 5000), ["not PyTorch's numbers"]),
]


@pytest.mark.parametrize("text,words", BAD_LOGS)
def test_bad_oom_logs_are_one_line(tmp_path, text, words):
    log = tmp_path / "oom.log"
    log.write_text(text)
    one_line_refusal(["explain", str(log)], *words)


def test_unreadable_logs_are_one_line(tmp_path):
    garbage = tmp_path / "garbage.log"
    garbage.write_bytes(bytes(range(256)) * 40_000)  # 10 MB of binary
    one_line_refusal(["explain", str(garbage)], "no CUDA out-of-memory message")
    one_line_refusal(["explain", str(tmp_path)], "is a directory")
    one_line_refusal(["explain", str(tmp_path / "missing.log")], "does not exist")


def test_a_zero_byte_request_is_flagged_not_a_traceback(tmp_path):
    log = tmp_path / "oom.log"
    log.write_text(new_oom(req="0 B"))
    alone = runs(["explain", str(log)])
    assert alone.exit_code == 0 and "0 B" in alone.output, alone.output
    with_job = runs(["explain", str(log), "--model", "llama-3.1-8b"])
    assert with_job.exit_code == 0 and "0 B, so it matches no component" in with_job.output, with_job.output


# ----------------------------------------------------------------------------- model config files

BASE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100, "model_type": "llama"}

BAD_CONFIGS = [
    ('{"hidden_size": 1e400, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100}',
     ["hidden_size must be positive", "got inf"]),
    ({"hidden_size": 64.5}, ["hidden_size must be positive: an integer", "got 64.5"]),
    ({"hidden_size": 4096.0}, ["hidden_size", "got 4096.0"]),
    ({"hidden_size": "4096"}, ["hidden_size", "got '4096'"]),
    ({"hidden_size": -64}, ["hidden_size", "from 1 to"]),
    ({"hidden_size": True}, ["hidden_size", "got True"]),
    ({"num_key_value_heads": 8}, ["num_key_value_heads 8 must divide num_attention_heads 4"]),
    ({"num_attention_heads": 8, "num_key_value_heads": 3}, ["num_key_value_heads 3 must divide"]),
    ({"num_key_value_heads": 0}, ["num_key_value_heads must be positive"]),
    ({"num_attention_heads": 3}, ["hidden_size 64 is not a multiple of num_attention_heads 3", "give head_dim"]),
    ({"max_position_embeddings": 0}, ["max_position_embeddings must be positive"]),
    ({"vocab_size": 0}, ["vocab_size must be positive"]),
    ({"num_hidden_layers": 1e12}, ["num_hidden_layers", "got 1000000000000.0"]),
    ({"num_hidden_layers": 10**12}, ["num_hidden_layers", f"to {MAX_DIM}"]),
    ({"num_hidden_layers": False}, ["num_hidden_layers", "got False"]),
    ({"intermediate_size": [1, 2]}, ["intermediate_size", "got [1, 2]"]),
    ({"head_dim": 0}, ["head_dim must be positive"]),
    ({"num_local_experts": 4, "num_experts_per_tok": 8}, ["num_experts_per_tok 8 exceeds the 4 experts"]),
    ({"num_local_experts": -1}, ["num_local_experts must be an integer from 0"]),
    ({"first_k_dense_replace": 5}, ["first_k_dense_replace 5 exceeds num_hidden_layers 2"]),
    ({"model_type": ["llama"]}, ["model_type must be a string"]),
    ({"kv_lora_rank": 1.5}, ["kv_lora_rank"]),
    ('[1, 2, 3]', ["expected a JSON object"]),
    ('{"hidden_size": 64,', ["not valid JSON"]),
]


@pytest.mark.parametrize("content,words", BAD_CONFIGS)
def test_bad_model_configs_are_one_line(tmp_path, content, words):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps({**BASE, **content}))
    one_line_refusal(["estimate", "--model", str(path), "--workload", "sft"], str(path), *words)


def test_a_sound_config_still_estimates(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**BASE, "quantization_config": "not a dict", "head_dim": None}))
    assert runs(["estimate", "--model", str(path), "--workload", "sft"]).exit_code == 0


@pytest.mark.parametrize("draft,words", [
    ({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 64.5}, ["intermediate_size"]),
    ({"hidden_size": 64, "num_attention_heads": 3, "intermediate_size": 128}, ["not a multiple", "give head_dim"]),
    ({"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 8, "intermediate_size": 128},
     ["num_key_value_heads 8 must divide"]),
    ({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128,
      "eagle_config": {"eagle_aux_hidden_state_layer_ids": ["a", None, 1.5]}}, ["layer indices"]),
    ({"config": [1, 2]}, ["draft config must be a JSON object"]),
])
def test_bad_draft_configs_are_one_line(tmp_path, draft, words):
    path = tmp_path / "draft.json"
    path.write_text(json.dumps(draft))
    one_line_refusal(["estimate", "--model", "llama-3.2-1b", "--draft", str(path)], *words)


@pytest.mark.parametrize("model,words", [
    ("~nouser/x", ["'~nouser' is not a user's home folder"]),
    ("~nouser/config.json", ["'~nouser' is not a user's home folder"]),
    ("x" * 5000, ["cannot be read as a path"]),
    ("no-such-model", ["unknown model 'no-such-model'"]),
    ("missing/config.json", ["file does not exist"]),
])
def test_bad_model_references_are_one_line(model, words):
    one_line_refusal(["estimate", "--model", model], *words)


def test_a_model_path_with_a_nul_byte_is_one_line(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text('model: "a\\0b/config.json"\n')
    one_line_refusal(["check", str(config)], "cannot be read as a path")


# ----------------------------------------------------------------------------- job values

@pytest.mark.parametrize("flags,words", [
    (["--ttt", "100000000"], ["ttt must be a positive integer (at most 1024)"]),
    (["--ttt", "0"], ["ttt must be a positive integer"]),
    (["--seq", str(2**41)], ["seq must be a positive integer (at most"]),
    (["--aux-layers", "1,2," + "9" * 40], ["aux_layers must be a list of layer indices"]),
    (["--aux-layers", "-1,2,3"], ["aux_layers"]),
])
def test_bad_job_numbers_are_one_line(flags, words):
    one_line_refusal(["estimate", "--model", "llama-3.1-8b", *flags], *words)


# ----------------------------------------------------------------------------- validate --from-results

ROW = {"name": "r1", "kind": "nvidia-h200", "status": "ran", "calibration": False, "seq": 1024, "micro_batch": 1,
       "pred_alloc": 10, "meas_alloc": 11, "pred_device": 12, "meas_device": 13, "pred_fits": True,
       "observed_fits": True}


@pytest.mark.parametrize("lines,words", [
    ([{k: v for k, v in ROW.items() if k != "name"}], ["rows.jsonl:1", "the row has no 'name'", "every row needs"]),
    ([ROW, {k: v for k, v in ROW.items() if k != "kind"}], ["rows.jsonl:2", "the row has no 'kind'"]),
    ([{**ROW, "status": None}], ["the row has no 'status'"]),
    ([{**ROW, "calibration": "no"}], ["calibration must be true or false"]),
    ([{**ROW, "name": ["a"]}], ["name must be a non-empty string"]),
    ([{**ROW, "seq": "long"}], ["seq must be a number or null, got str"]),
    ([{**ROW, "meas_alloc": [1]}], ["meas_alloc must be a number or null, got list"]),
    ([{**ROW, "observed_fits": "yes"}], ["observed_fits must be true or false or null"]),
    ([{**ROW, "reason": 42}], ["reason must be a string or null"]),
    ([{**ROW, "finished": "yesterday"}], ["finished must be a number or null"]),
    ([[1, 2]], ["a result row must be a JSON object, got list"]),
    (["{not json"], ["rows.jsonl:1: not a JSON line"]),
    (["[" * 100_000], ["not a JSON line"]),
])
def test_bad_result_rows_are_one_line(tmp_path, lines, words):
    folder = tmp_path / "results"
    folder.mkdir()
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    (folder / "rows.jsonl").write_text(text + "\n")
    one_line_refusal(["validate", "--from-results", str(folder), "--no-repredict", "--out", str(tmp_path / "out")],
                     *words)


def test_rows_without_optional_fields_still_report(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    rows = [{k: v for k, v in ROW.items() if k not in ("seq", "micro_batch")}, {**ROW, "name": "r2", "finished": 1.5}]
    (folder / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = runs(["validate", "--from-results", str(folder), "--no-repredict", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


def test_bad_validate_folders_are_one_line(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "rows.jsonl").write_text(json.dumps(ROW) + "\n")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    one_line_refusal(["validate", "--from-results", str(tmp_path / "missing")], "no such folder")
    one_line_refusal(["validate", "--from-results", str(folder), "--out", str(a_file)], "is a file")
    one_line_refusal(["validate", "--from-results", str(folder), "--out", str(a_file / "sub")],
                     "cannot make the folder")


# ----------------------------------------------------------------------------- offline features

FEATURES = ["estimate", "--model", "llama-3.1-8b", "--runtime", "specforge", "--offline"]


@pytest.mark.parametrize("flags,words", [
    (["--samples", "-5"], ["--samples must be a positive integer", "got -5"]),
    (["--samples", "0"], ["--samples must be a positive integer"]),
    (["--samples", str(2**41)], ["--samples must be a positive integer (at most"]),
    (["--tokenizer", "tokenizer.json"], ["--tokenizer counts the tokens of --samples-from"]),
    (["--samples", "3", "--workload", "sft", "--runtime", "fitplan", "--no-offline"], ["the sft workload stores none"]),
])
def test_bad_feature_flags_are_one_line(flags, words):
    one_line_refusal([*FEATURES, *flags], *words)


@pytest.mark.parametrize("text,words", [
    ("{not json\n", ["c.jsonl:1: not valid JSON", "accepted: one JSON object a line"]),
    ('{"conversations": []}\n[1, 2]\n', ["c.jsonl:2: no 'conversations' or 'messages' list"]),
    ('{"text": "hello"}\n', ["c.jsonl:1: no 'conversations' or 'messages' list"]),
    ('{"messages": [{"role": "user"}]}\n', ["c.jsonl:1: a message without text"]),
    ('{"conversations": "hi"}\n', ["no 'conversations' or 'messages' list"]),
    ("[" * 100_000 + "\n", ["c.jsonl:1: not valid JSON"]),
    ("\n\n", ["holds no conversations"]),
])
def test_broken_jsonl_lines_are_one_line(tmp_path, text, words):
    path = tmp_path / "c.jsonl"
    path.write_text(text)
    one_line_refusal([*FEATURES, "--samples-from", str(path)], *words)


def test_unreadable_feature_files_are_one_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}\n')
    one_line_refusal([*FEATURES, "--samples-from", str(path)], "c.jsonl:1: not UTF-8 text")
    one_line_refusal([*FEATURES, "--samples-from", str(tmp_path / "missing.jsonl")], "does not exist")
    one_line_refusal([*FEATURES, "--samples-from", str(tmp_path)], "is a directory")
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n' * 2)
    one_line_refusal([*FEATURES, "--samples-from", str(path), "--samples", "3"], "holds only 2 conversations")
    pytest.importorskip("tokenizers")
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text("{}")
    one_line_refusal([*FEATURES, "--samples-from", str(path), "--tokenizer", str(bogus)], "not a tokenizer.json")
    one_line_refusal([*FEATURES, "--samples-from", str(path), "--tokenizer", str(tmp_path / "no.json")],
                     "not a file; give a local tokenizer.json")


def test_fit_o_of_a_run_config_refuses_what_it_cannot_write(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  target_model_path: Qwen/Qwen3-8B\ndata:\n  hidden_states_path: ./hs\n")
    out = tmp_path / "run.fitted.yaml"
    one_line_refusal(["fit", str(config), "--model", "llama-3.1-8b", "-o", str(out)], "given as fitplan flags")
    assert not out.exists()


# ----------------------------------------------------------------------------- fit: capture servers

MANAGED_RUN = """\
model: {{target_model_path: Qwen/Qwen3-8B}}
data: {{train_data_path: ./train.jsonl}}
deployment:
  mode: disaggregated
  disaggregated:
    control_dir: ./control
    backend: mooncake
    managed_local:
      trainer_cuda_visible_devices: ["0"]
      capture_servers:
        - {{port: 30000, cuda_visible_devices: {devices}, tp_size: {tp}}}
"""


@pytest.mark.parametrize("devices,tp,flags,words", [
    ('["1"]', 1, ["--node-gpus", "0"], ["--node-gpus 0 is out of range", "accepted: 1 to"]),
    ('["1"]', 1, ["--node-gpus", str(2**40)], ["out of range"]),
    ('["1", "5"]', 2, ["--node-gpus", "4"], ["--node-gpus 4", "lists GPU 5", "accepted: at least 6"]),
    ('["1"]', 2, [], ["capture_servers[0].cuda_visible_devices lists 1 for tp_size 2",
                      "one device per tp rank", "accepted: a list of 2 devices"]),
    ('"1"', 1, [], ["capture_servers[0].cuda_visible_devices is '1' for tp_size 1"]),
])
def test_bad_capture_server_fits_are_one_line(tmp_path, devices, tp, flags, words):
    config = tmp_path / "run.yaml"
    config.write_text(MANAGED_RUN.format(devices=devices, tp=tp))
    out = tmp_path / "run.fitted.yaml"
    one_line_refusal(["fit", str(config), *flags, "-o", str(out)], *words)
    assert not out.exists()


def test_node_gpus_is_refused_for_a_job_without_managed_servers():
    one_line_refusal(["fit", "--model", "llama-3.2-1b", "--node-gpus", "8"],
                     "--node-gpus counts the GPUs of a SpecForge v0.3 run's managed_local node", "no managed capture")


# ----------------------------------------------------------------------------- speculators commands

SPEC_TRAIN = "torchrun --nproc_per_node 2 scripts/train.py --verifier-name-or-path Qwen/Qwen3-8B"


@pytest.mark.parametrize("value,words", [
    (f"{SPEC_TRAIN} --no-such-flag 3", ["unknown flag --no-such-flag"]),
    (f"{SPEC_TRAIN} --total-seq-len 8k", ["--total-seq-len must be an integer, got '8k'"]),
    (f"{SPEC_TRAIN} --total-seq-len -8", ["--total-seq-len must be a positive integer"]),
    (f"{SPEC_TRAIN} --draft-attn-impl flash", ["'flash' is not one of: simple_flex_attention, sdpa, eager"]),
    (f"{SPEC_TRAIN} --speculator-type mtp", ["--speculator-type mtp", "accepted: eagle3"]),
    (f"{SPEC_TRAIN} --target-layer-ids", ["--target-layer-ids needs a value"]),
    (f"{SPEC_TRAIN} --target-layer-ids 1 x 3", ["--target-layer-ids must be an integer, got 'x'"]),
    (f"{SPEC_TRAIN} --fsdp-shard=true", ["--fsdp-shard takes no value"]),
    (f"{SPEC_TRAIN} 'unclosed", ["cannot split it into words"]),
    ("torchrun --nproc_per_node two scripts/train.py --verifier-name-or-path Qwen/Qwen3-8B",
     ["--nproc_per_node 'two' must be a positive integer"]),
    ("torchrun --nproc_per_node $N scripts/train.py --verifier-name-or-path Qwen/Qwen3-8B",
     ["$N, which the script does not set", "--gpus"]),
    ("python scripts/train.py --verifier-name-or-path ./nowhere", ["resolves to no model profile"]),
    ("python scripts/prepare_data.py --model x", ["no speculators script found"]),
    (f"{SPEC_TRAIN} --config missing.yaml", ["config file 'missing.yaml' does not exist"]),
])
def test_bad_speculators_commands_are_one_line(value, words):
    one_line_refusal(["estimate", "--from-speculators", value], *words)


def test_bad_speculators_run_yamls_are_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  verifier:\n    verifier_name_or_path: Qwen/Qwen3-8B\n  data:\n    total_seq_len: [1]\n")
    one_line_refusal(["check", str(path)], "data.total_seq_len must be an integer")
    path.write_text("train:\n  verifier:\n    verifier_name_or_path: Qwen/Qwen3-8B\n  trainer:\n    fsdp_shard: 2\n")
    one_line_refusal(["estimate", "--from-speculators", str(path)], "trainer.fsdp_shard must be true or false")


# ----------------------------------------------------------------------------- --plot

def test_bad_plot_paths_are_refused_before_anything_is_computed(tmp_path):
    pytest.importorskip("matplotlib")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    # the model is unknown too: the plot path is checked first, so nothing was computed
    base = ["estimate", "--model", "no-such-model", "--plot"]
    one_line_refusal([*base, str(tmp_path)], "is a folder", str(tmp_path / "estimate.png"))
    one_line_refusal([*base, str(tmp_path / "missing" / "x.png")], "the folder", "does not exist")
    one_line_refusal([*base, str(a_file / "x.png")], "is a file, not a folder")
    one_line_refusal([*base, str(tmp_path / "x.txt")], "cannot write a '.txt' image", ".png")


def test_plot_says_exactly_the_file_it_wrote(tmp_path):
    pytest.importorskip("matplotlib")
    result = runs(["estimate", "--model", "llama-3.2-1b", "--plot", str(tmp_path / "breakdown")])
    assert result.exit_code == 0, result.output
    written = tmp_path / "breakdown.png"
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "breakdown").exists()
    assert f"plot written to {written}" in result.output.replace("\n", "")


# ----------------------------------------------------------------------------- fitplan check on hostile files

def _alias_bomb(levels: int = 9) -> str:
    names = "abcdefghijk"
    text = "model: llama-3.1-8b\nl0: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for i in range(1, levels):
        text += f"l{i}: &{names[i]} [{', '.join(['*' + names[i - 1]] * 9)}]\n"
    return text


def _alias_bomb_in_a_field() -> str:
    return _alias_bomb().replace("model: llama-3.1-8b\n", "") + "model: llama-3.1-8b\naux_layers: *i\n"


HOSTILE_FILES = [
    (b"", ["the target model is required"]),
    (b"- model: llama-3.1-8b\n- seq: 1\n", ["expected a mapping", "got list"]),
    (b"42\n", ["expected a mapping", "got int"]),
    (b"just a sentence\n", ["expected a mapping", "got str"]),
    (bytes(range(256)) * 20, ["not UTF-8"]),
    (b"model: llama-3.1-8b\n" + b"# padding\n" * 1_048_576, ["too large for a config", "at most 64 KiB"]),
    (b"model: " + b"x" * 70_000 + b"\n", ["too long for a config"]),
    (_alias_bomb().encode(), ["once YAML aliases are expanded"]),
    (_alias_bomb_in_a_field().encode(), ["once YAML aliases are expanded"]),
    (b"model: llama-3.1-8b\naux_layers: &a [*a]\n", ["refers to itself"]),
    (b"model: " + b"[" * 5000 + b"]" * 5000 + b"\n", ["YAML"]),
    (b"model: llama-3.1-8b\nseq: " + b"9" * 5000 + b"\n", ["integer thousands of digits long"]),
    (b"model: llama-3.1-8b\nseq: 2024-99-99\n", ["impossible date"]),
    (b"model: llama-3.1-8b\nseq: 4096.5\n", ["seq must be a positive integer"]),
    (b"model: llama-3.1-8b\nseq: .inf\n", ["seq must be a positive integer"]),
    (b"model: llama-3.1-8b\nsglang_mem_fraction: .nan\n", ["sglang_mem_fraction must be a number"]),
    (b"model: llama-3.1-8b\nac: yes please\n", ["ac must be true or false"]),
    (b"model: [1, 2]\n", ["model is required", "got [1, 2]"]),
    (b"model: !!python/object/apply:os.system [ls]\n", ["not valid YAML"]),
    (b"model: llama-3.1-8b\nworkload: " + "\u00e9\u00e8\U0001f600".encode() * 100 + b"\n",
     ["workload", "is not one of"]),
    (b"model: llama-3.1-8b\n" + b"".join(b"k%d: 1\n" % i for i in range(3000)), ["unknown key(s)", "more"]),
    (b"{model: llama-3.1-8b, [a, b]: 1}\n", ["not valid YAML"]),
    (b"\xff\xfem\x00o\x00d\x00e\x00l\x00", ["not UTF-8"]),
]


@pytest.mark.parametrize("content,words", HOSTILE_FILES)
def test_check_answers_hostile_files_in_one_line(tmp_path, content, words):
    config = tmp_path / "job.yaml"
    config.write_bytes(content)
    line = one_line_refusal(["check", str(config)], *words)
    assert len(line) < 2000, len(line)  # no value is printed whole


def test_estimate_refuses_utf16_a_folder_and_a_device(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_bytes("model: llama-3.1-8b\n".encode("utf-16"))
    one_line_refusal(["estimate", str(config)], "not UTF-8 text", "UTF-16")
    one_line_refusal(["estimate", str(tmp_path)], "is a directory")
    if Path("/dev/null").exists():
        one_line_refusal(["estimate", "/dev/null"], "not a regular file")


# ----------------------------------------------------------------------------- fuzzed readers

def _timed(call, *args):
    """Run a reader; it must return or raise FitplanError, within PER_CALL_SECONDS."""
    start = time.perf_counter()
    try:
        return call(*args)
    except FitplanError as exc:
        assert "\n" not in str(exc), str(exc)
        return exc
    finally:
        assert time.perf_counter() - start < PER_CALL_SECONDS, (call.__name__, args)


HUGE = st.sampled_from([10**400, -(10**400), 2**63, 2**40, 2**40 + 1, 2**31, 2**31 + 1, -1, 0, 1])
ODD_TEXT = st.sampled_from(["", " ", "1e400", "nan", "inf", "8xH100", "llama-3.1-8b", "a\0b", "~nouser/x",
                            "\u00fc\u00df\u4e2d\U0001f600", "9" * 5000, "x" * 100_000, "1,17,33", "true"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), HUGE, st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=30), ODD_TEXT)
VALUES = st.recursive(SCALARS, lambda kids: st.one_of(st.lists(kids, max_size=5),
                                                      st.dictionaries(st.text(max_size=8), kids, max_size=4)),
                      max_leaves=12)


def _field(name: str):
    """Random values, and for a choice field its valid values too (to get past the first check)."""
    if name in CHOICES:
        return st.one_of(st.sampled_from(CHOICES[name]), VALUES)
    return VALUES


SPEC_MAPPINGS = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(["llama-3.1-8b", "llama-3.2-1b", "qwen3-8b"]), VALUES)},
    optional={**{name: _field(name) for name in FIELD_NAMES if name != "model"},
              "unknown_key": VALUES, "": VALUES},
)


@FUZZ
@given(SPEC_MAPPINGS)
def test_spec_from_mapping_returns_or_refuses_quickly(values):
    out = _timed(spec_from_mapping, values, "fuzz.yaml")
    assert isinstance(out, (RunSpec, FitplanError))
    if isinstance(out, RunSpec):  # what was accepted resolves, or is refused in one line, quickly
        _timed(resolve, out)


@FUZZ
@given(SPEC_MAPPINGS)
def test_load_spec_reads_any_dumped_mapping(values):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
        assert isinstance(_timed(load_spec, path, {}), (RunSpec, FitplanError))


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(lambda b: b.decode("latin-1")),
                 st.lists(st.sampled_from(["model: llama-3.1-8b\n", "seq: ", "&a ", "*a", "[", "]", "{", "}",
                                           ": ", "- ", "\n", "!!binary ", "'", '"', "\t", "999999999999"]),
                          max_size=40).map("".join)))
def test_load_spec_reads_any_text(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        assert isinstance(_timed(load_spec, path, {}), (RunSpec, FitplanError))


CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
               "head_dim", "intermediate_size", "max_position_embeddings", "num_local_experts", "num_experts_per_tok",
               "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace", "kv_lora_rank", "q_lora_rank",
               "model_type", "tie_word_embeddings", "quantization_config", "mla", "final_logit_softcapping"]
SIZES = st.one_of(st.sampled_from([1, 2, 4, 8, 64, 128, 4096, MAX_DIM, MAX_DIM + 1]), st.integers(-5, 10**6))
CONFIG_VALUES = st.one_of(SIZES, SIZES, VALUES)
REQUIRED_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
CONFIGS = st.fixed_dictionaries(
    {"hidden_size": CONFIG_VALUES, "num_hidden_layers": CONFIG_VALUES, "num_attention_heads": CONFIG_VALUES,
     "vocab_size": CONFIG_VALUES},
    optional={**{k: CONFIG_VALUES for k in CONFIG_KEYS if k not in REQUIRED_KEYS}, "text_config": st.dictionaries(
        st.sampled_from(CONFIG_KEYS), CONFIG_VALUES, max_size=6)},
)


@FUZZ
@given(st.one_of(CONFIGS, st.dictionaries(st.text(max_size=10), VALUES, max_size=6), VALUES))
def test_model_configs_give_a_sound_shape_or_one_line(cfg):
    out = _timed(model_shape_from_config, cfg, "fuzz", "config.json")
    assert isinstance(out, (ModelShape, FitplanError))
    if isinstance(out, ModelShape):
        sizes = (out.hidden, out.layers, out.heads, out.kv_heads, out.head_dim, out.vocab, out.intermediate)
        assert all(type(v) is int and 1 <= v <= MAX_DIM for v in sizes), sizes
        assert out.heads % out.kv_heads == 0
        _timed(count_params, out)  # arithmetic on the accepted sizes stays bounded


GPU_PARTS = st.sampled_from(["8", "x", "X", "\u00d7", "H100", "h200", " ", "-1", "0", "99999999999999999999", "2",
                             "A100-80GB", "GB200 NVL72 (per Blackwell GPU)", "\n", "+", "1024", "1025", "100000"])


@FUZZ
@given(st.one_of(st.text(max_size=60), st.lists(GPU_PARTS, max_size=8).map("".join)))
def test_gpu_strings_give_a_bounded_cluster_or_one_line(text):
    out = _timed(parse_gpus, text)
    assert isinstance(out, (Cluster, FitplanError))
    if isinstance(out, Cluster):
        assert 1 <= out.nodes <= MAX_NODES and 1 <= out.gpus_per_node <= MAX_GPUS_PER_NODE


SIZE_TEXT = st.one_of(
    st.builds(lambda n, u: f"{n} {u}", st.one_of(st.floats(0, 1e6).map(lambda f: f"{f:.2f}"),
                                                 st.from_regex(r"[0-9.]{1,500}", fullmatch=True)),
              st.sampled_from(["B", "bytes", "KiB", "MiB", "GiB", "TiB"])),
    st.text(max_size=12),
)


@FUZZ
@given(SIZE_TEXT, SIZE_TEXT, SIZE_TEXT, SIZE_TEXT, SIZE_TEXT, SIZE_TEXT, st.booleans())
def test_oom_messages_are_read_or_refused_in_one_line(req, total, free, this, alloc, cached, old):
    if old:
        text = OLD.format(req=req, total=total, alloc=alloc, free=free, reserved=cached)
    else:
        text = new_oom(req=req, total=total, free=free, this=this, alloc=alloc, cached=cached)
    out = _timed(parse_ooms, text)
    if not isinstance(out, FitplanError):
        for event in out:
            assert 0 < event.total and 0 <= event.free <= event.total and event.allocated <= event.reserved
            assert all(math.isfinite(v) for v in (event.requested, event.total, event.free))
