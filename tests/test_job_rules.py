"""One model of a job: every command refuses the same bad job with the same one line, before
anything is computed, loaded or launched; YAML values are typed strictly; repo ids resolve alike."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import CHOICES, FIELD_NAMES, field_type
from fitplan.errors import FitplanError
from fitplan.ladder import fit
from fitplan.layout import resolve, tp_options
from fitplan.config import RunSpec
from fitplan.profiles import load_model, load_model_config, model_names
from fitplan.specforge import resolve_target

# Jobs each rule refuses, with the words the refusal must hold.
BAD_JOBS = [
    (["--model", "qwen3-235b-a22b", "--gpus", "8xH200", "--tp", "8"], "does not divide the 4 KV heads"),
    (["--model", "llama-3.1-8b", "--aux-layers", "1,2"], "reads exactly 3 target layers"),
    (["--model", "llama-3.1-8b", "--aux-layers", "2,1,3"], "distinct and in increasing order"),
    (["--model", "llama-3.1-8b", "--aux-layers", "1,1,3"], "distinct and in increasing order"),
    (["--model", "llama-3.1-8b", "--aux-layers", "1,2,32"], "outside the 32 layers"),
    (["--model", "llama-3.1-8b", "--gpus", "2xH100", "--sharding", "none"], "accepted: zero2, zero3"),
    (["--model", "llama-3.1-8b", "--gpus", "2xH100", "--sharding", "zero1"], "accepted: zero2, zero3"),
    (["--model", "llama-3.1-8b", "--gpus", "2xH100", "--offload", "optimizer"], "offloads the optimizer of one GPU"),
    (["--model", "llama-3.1-8b", "--optimizer", "adamw-8bit", "--offload", "optimizer"], "8 bits save no GPU memory"),
    (["--model", "llama-3.1-8b", "--sharding", "zero3", "--offload", "params"], "sets no CPUOffloadPolicy"),
    (["--model", "gpt-oss-20b", "--target-weights", "mxfp4"], "fetches its Triton kernels from the Hugging Face hub"),
    (["--model", "llama-3.1-8b", "--target-backend", "hf"], "describe the specforge runtime"),
    (["--model", "deepseek-v3", "--gpus", "8xH200", "--tp", "8"], "splits no deepseek_v3 target"),
    (["--model", "llama-3.1-8b", "--workload", "sft", "--runtime", "specforge"], "eagle3 workload only"),
    (["--model", "llama-3.1-8b", "--workload", "sft", "--attention", "split"], "sft trains a causal model"),
    (["--model", "llama-3.1-8b", "--runtime", "specforge", "--attention", "split"], "specforge runs its own"),
    (["--model", "llama-3.1-8b", "--runtime", "speculators", "--attention", "split"], "speculators runs its own"),
]


def one_line_refusal(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (args, result.output)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


OOM_LOG = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total "
           "capacity; 70.00 GiB already allocated; 1.00 GiB free; 75.00 GiB reserved in total by PyTorch)")


def refusals_by_command(tmp_path, job: list[str], config_keys: dict, train: bool = True) -> dict[str, str]:
    """Each command's one-line refusal of the job `job`: check's of the same job as a YAML file
    (`config_keys`; the file's name it leads with left out), explain's with an OOM message, and
    train's (when `train`) with nothing written."""
    config = tmp_path / "job.yaml"
    config.write_text(yaml.safe_dump(config_keys))
    log = tmp_path / "oom.log"
    log.write_text(OOM_LOG)
    lines = {
        "estimate": one_line_refusal(["estimate", *job]),
        "fit": one_line_refusal(["fit", *job]),
        "check": one_line_refusal(["check", str(config)]).replace(f"{config}: ", ""),
        "explain": one_line_refusal(["explain", str(log), *job]),
    }
    if train:
        lines["train"] = one_line_refusal(["train", *job, "--random-weights", "--synthetic-data", "--device", "cpu",
                                           "--output", str(tmp_path / "run")])
        assert not (tmp_path / "run").exists()  # refused before anything was written
    return lines


@pytest.mark.parametrize("job,words", BAD_JOBS)
def test_every_command_refuses_a_bad_job_alike(tmp_path, job, words):
    flags = dict(zip(job[::2], job[1::2]))
    keys = {k[2:].replace("-", "_"): v for k, v in flags.items()}
    if "aux_layers" in keys:
        keys["aux_layers"] = [int(x) for x in keys["aux_layers"].split(",")]
    if "tp" in keys:
        keys["tp"] = int(keys["tp"])
    # train runs eagle3 on fitplan's runtime only
    lines = refusals_by_command(tmp_path, job, keys, train="--workload" not in job and "--runtime" not in job)
    for command, line in lines.items():
        assert words in line, (command, line)
    # the same reason from every command
    reasons = {line.split(": ", 1)[1] for line in lines.values()}
    assert len(reasons) == 1, lines


def test_fit_never_proposes_what_the_rules_refuse():
    # llama-3.1-405b on 8xH200: offload would fit; the trainer offloads one GPU's optimizer only
    result = fit(RunSpec(model="llama-3.1-405b", gpus="8xH200"))
    assert {change for change, _ in result.refused} >= {"offload optimizer", "offload params (zero3)"}
    for entry in result.trail:
        assert "offload" not in entry.change
    # qwen3-235b-a22b has 4 KV heads: the planner's own choice of tp is one the trainer takes
    job = resolve(RunSpec(model="qwen3-235b-a22b", gpus="8xH200"))
    assert job.tp == 4 and tp_options(job.model, 8, "fitplan") == [1, 2, 4]
    assert tp_options(job.model, 8, "specforge") == [1, 2, 4, 8]  # SGLang replicates KV heads


# ---------------------------------------------------------------- strict YAML types

WRONG_VALUES = ["false", "no", "maybe", "4096", 4.5, True, [1], {"a": 1}, "", None, 2**70]


def _accepts(name: str, value) -> bool:
    kind, optional = field_type(name)
    if value is None:
        return optional
    if name in CHOICES:
        return value in CHOICES[name]
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 2**40
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str) and bool(value.strip())
    return False  # aux_layers: none of the wrong values is a list of three layer indices


@pytest.mark.parametrize("name", [n for n in FIELD_NAMES if n not in ("model", "aux_layers")])
def test_every_key_takes_only_its_type(tmp_path, name):
    for value in WRONG_VALUES:
        if _accepts(name, value):
            continue
        path = tmp_path / "job.yaml"
        path.write_text(yaml.safe_dump({"model": "llama-3.1-8b", name: value}))
        line = one_line_refusal(["check", str(path)])
        assert name in line, (value, line)


def test_a_yaml_false_string_is_refused_not_read_as_true(tmp_path):
    # gpt-oss-120b on 8xH100 at its defaults is AT RISK; expandable segments make it fit. Written
    # as the string "false", the key must not turn the gate green.
    path = tmp_path / "job.yaml"
    path.write_text('model: gpt-oss-120b\ngpus: 8xH100\nexpandable_segments: "false"\n')
    line = one_line_refusal(["check", str(path)])
    assert "expandable_segments must be true or false" in line
    path.write_text("model: gpt-oss-120b\ngpus: 8xH100\nexpandable_segments: false\n")
    assert CliRunner().invoke(app, ["check", str(path)]).exit_code == 1


@pytest.mark.parametrize("encoding,words", [("utf-16", "not UTF-8 text"), ("utf-8-sig", None)])
def test_file_encodings(tmp_path, encoding, words):
    path = tmp_path / "job.yaml"
    path.write_text("model: llama-3.1-8b\n", encoding=encoding)
    if words is None:  # a BOM is dropped
        assert CliRunner().invoke(app, ["estimate", str(path)]).exit_code == 0
    else:
        assert words in one_line_refusal(["estimate", str(path)])


def test_deeply_nested_yaml_is_refused(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: " + "[" * 5000 + "]" * 5000 + "\n")
    one_line_refusal(["estimate", str(path)])


# ---------------------------------------------------------------- model references

VARIANTS = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "llama-3.1-8b",
    "google/gemma-2-9b-it": "gemma-2-9b",
    "google/gemma-3-12b-pt": "gemma-3-12b",
    "Qwen/Qwen3-8B-Base": "qwen3-8b",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral-7b-v0.3",
    "deepseek-ai/DeepSeek-V3-Base": "deepseek-v3",
    "Qwen/Qwen3-235B-A22B-Instruct-2507": "qwen3-235b-a22b",
    "Qwen/Qwen3-30B-A3B-Thinking-2507": "qwen3-30b-a3b",
}


@pytest.mark.parametrize("repo,profile", VARIANTS.items())
def test_repo_ids_and_their_variants_resolve_alike_everywhere(repo, profile):
    assert load_model_config(repo)[0] == profile  # train's hf_config reads the model through this
    assert load_model(repo) == load_model(profile)  # estimate, fit, check, explain
    assert resolve_target(repo) == profile  # the SpecForge reader
    result = CliRunner().invoke(app, ["estimate", "--model", repo, "--json"])
    assert result.exit_code == 0 and f'"model": "{profile}"' in result.output


def test_every_profile_is_found_by_its_own_repo_id():
    for name in model_names():
        repo = str(load_model_config(name)[1].get("hf_repo", "")).split()[0]
        assert load_model_config(repo)[0] == name, repo


def test_an_unknown_model_is_one_line_with_suggestions():
    with pytest.raises(FitplanError, match="did you mean llama-3.1-8b"):
        load_model("meta-llama/Llama-3.1-8C")
