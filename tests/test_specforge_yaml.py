"""SpecForge v0.3 run configs (`specforge train -c run.yaml k=v`) read into the trainer GPUs' job.

Each example config below is estimated through the CLI and compared with the RunSpec written out
by hand from the mapping of docs/fit.md, "SpecForge jobs": the trainers hold the draft, its
optimizer and the frozen lm_head (runtime specforge, offline true) in both offline and online
disaggregated runs.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import RunSpec, load_spec, spec_from_text
from fitplan.errors import FitplanError
from fitplan.estimator import estimate_spec
from fitplan.specforge_yaml import is_v03_config, v03_mapping

# Qwen3-8B trained from stored features on one GPU, as in examples/configs/qwen3-8b-eagle3-offline.yaml.
OFFLINE_YAML = """\
# offline EAGLE3 run: the trainer reads the target's features from disk (train_eagle3 successor)
model:
  target_model_path: Qwen/Qwen3-8B
  draft_model_config: configs/qwen3-8b-eagle3.json
  target_backend: sglang
  vocab_mapping_path: ./cache/vocab_mapping/qwen3-8b-eagle3.pt
  torch_dtype: bfloat16
data:
  hidden_states_path: ./cache/hidden_states/qwen3-8b-sharegpt
  max_length: 4096
  chat_template: qwen
training:
  strategy: eagle3
  num_epochs: 10
  batch_size: 1
  learning_rate: 1.0e-4
  ttt_length: 7
  attention_backend: flex_attention
  save_interval: 1000
  seed: 0
run_id: qwen3-8b-offline-test
output_dir: ./outputs/qwen3-8b-offline-test
deployment:
  mode: local_colocated
  trainer:
    nnodes: 1
    nproc_per_node: 1
"""

# Online: features streamed from an external SGLang capture server through Mooncake, two trainer
# GPUs, as in examples/configs/qwen3-8b-eagle3-disaggregated.yaml (with other batch settings).
DISAGGREGATED_YAML = """\
model:
  target_model_path: Qwen/Qwen3-8B
  draft_model_config: configs/qwen3-8b-eagle3.json
  vocab_mapping_path: cache/vocab_mapping/qwen3-8b.pt
  sglang_mem_fraction_static: 0.3
data:
  train_data_path: ./cache/dataset/sharegpt_train.jsonl
  max_length: 8192
  build_dataset_num_proc: 64
training:
  strategy: eagle3
  max_steps: 10000
  batch_size: 2
  accumulation_steps: 4
  ttt_length: 6
  attention_backend: fa
tracking:
  report_to: tensorboard
deployment:
  mode: disaggregated
  trainer:
    nnodes: 1
    nproc_per_node: 2
  disaggregated:
    control_dir: outputs/run/control
    consumer_state_dir: outputs/run/consumer-state
    backend: mooncake
    server_urls:
      - http://127.0.0.1:30000
    mooncake_metadata_server: http://127.0.0.1:35880/metadata
    mooncake_master_server_addr: 127.0.0.1:35551
"""

# The mapping written out: model.target_model_path Qwen/Qwen3-8B -> profile qwen3-8b; the draft
# config qwen3-8b-eagle3.json -> draft profile qwen3-8b; data.max_length -> seq; batch_size ->
# micro_batch; accumulation_steps -> accum; ttt_length -> ttt; flex_attention -> flex, fa -> sdpa;
# nnodes x nproc_per_node trainer GPUs of type H100 (assumed); tp 1; SpecForge's fixed knobs.
FIXED = dict(runtime="specforge", offline=True, target_backend="sglang", sharding="zero2",
             precision="bf16-master", optimizer="adamw", offload="none", tp=1, workload="eagle3")
OFFLINE_SPEC = RunSpec(model="qwen3-8b", draft="qwen3-8b", gpus="1xH100", seq=4096, micro_batch=1, accum=1,
                       ttt=7, attention="flex", **FIXED)
DISAGGREGATED_SPEC = RunSpec(model="qwen3-8b", draft="qwen3-8b", gpus="2xH100", seq=8192, micro_batch=2, accum=4,
                             ttt=6, attention="sdpa", **FIXED)


@pytest.fixture
def offline(tmp_path):
    path = tmp_path / "offline.yaml"
    path.write_text(OFFLINE_YAML)
    return path


@pytest.fixture
def disaggregated(tmp_path):
    path = tmp_path / "disaggregated.yaml"
    path.write_text(DISAGGREGATED_YAML)
    return path


def _estimate(args):
    result = CliRunner().invoke(app, ["estimate", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


@pytest.mark.parametrize("which", ["offline", "disaggregated"])
def test_estimate_equals_the_runspec_written_by_hand(which, request):
    path = request.getfixturevalue(which)
    expected = OFFLINE_SPEC if which == "offline" else DISAGGREGATED_SPEC
    want = estimate_spec(expected).to_json()
    for args in ([str(path)], ["--from-specforge", str(path)]):
        out, _ = _estimate(args)
        config = out.pop("config")
        assert out == want
        assert RunSpec(**{**config, "aux_layers": None}) == expected
    assert load_spec(path) == expected  # check, diff and train read it alike


def test_warnings_name_what_was_assumed_or_ignored(offline, disaggregated):
    _, err = _estimate([str(offline)])
    assert "H100 assumed" in err
    assert "capture servers" not in err  # offline: the features come from disk
    _, err = _estimate([str(disaggregated)])
    assert "capture servers (1 external" in err and "outside this estimate" in err
    assert "ignored (not modelled by fitplan): model.sglang_mem_fraction_static" in err
    assert "tracking" not in err and "max_steps" not in err  # no effect on memory: quiet


def test_gpus_flag_gives_the_type_and_the_config_the_count(disaggregated):
    out, err = _estimate([str(disaggregated), "--gpus", "8xH200"])
    assert out["config"]["gpus"] == "2xH200"
    assert "--gpus 8xH200: its count is ignored; the config trains on 2 GPUs" in err
    assert "assumed" not in err
    out, err = _estimate([str(disaggregated), "--gpus", "2xH200"])
    assert out["config"]["gpus"] == "2xH200" and "ignored;" not in err


def test_overrides_in_the_from_specforge_value_change_the_job(offline):
    value = (f"{offline} training.batch_size=2 data.max_length=16384 deployment.trainer.nproc_per_node=4 "
             "training.attention_backend=eager model.aux_hidden_state_layer_ids=[2,18,32] "
             "training.accumulation_steps=3")
    out, _ = _estimate(["--from-specforge", value])
    expected = OFFLINE_SPEC.replace(micro_batch=2, seq=16384, gpus="4xH100", attention="eager",
                                    aux_layers=(2, 18, 32), accum=3)
    config = out.pop("config")
    assert out == estimate_spec(expected).to_json()
    assert (config["micro_batch"], config["seq"], config["gpus"], config["aux_layers"]) == (2, 16384, "4xH100",
                                                                                           [2, 18, 32])


def test_fitplan_flags_override_the_config(offline):
    out, _ = _estimate([str(offline), "--seq", "2048", "--micro-batch", "3"])
    assert (out["config"]["seq"], out["config"]["micro_batch"]) == (2048, 3)


def test_ignored_keys_are_listed_once(offline):
    _, err = _estimate(["--from-specforge", f"{offline} training.compact_teacher=true runtime.producer_lease=4 "
                                           "training.objective_chunk_blocks=0 training.learning_rate=5e-5"])
    lines = [line for line in err.splitlines() if "ignored" in line]
    assert lines == ["warning: ignored (not modelled by fitplan): training.objective_chunk_blocks, "
                     "training.compact_teacher, runtime.producer_lease"]


def _fails(args):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("override, named", [
    ("training.strategy=dflash", "training.strategy 'dflash': fitplan models EAGLE3 drafts only"),
    ("training.fsdp_sharding=FULL_SHARD", "training.fsdp_sharding FULL_SHARD is not modelled yet for SpecForge v0.3"),
    ("training.fsdp_sharding=NO_SHARD", "training.fsdp_sharding NO_SHARD is not modelled yet"),
    ("training.optimizer_cpu_offload=true", "training.optimizer_cpu_offload true is not modelled yet"),
    ("training.tp_size=2", "training.tp_size 2 is not modelled yet"),
    ("training.sp_ulysses_size=2", "training.sp_ulysses_size 2 is not modelled yet"),
    ("training.sp_ring_size=2", "training.sp_ring_size 2 is not modelled yet"),
    ("training.attention_backend=usp", "training.attention_backend usp (sequence parallel) is not modelled"),
])
def test_settings_fitplan_cannot_model_are_refused_in_one_line(offline, override, named):
    assert named in _fails(["estimate", "--from-specforge", f"{offline} {override}"])


def test_refusals_in_the_file_itself(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(OFFLINE_YAML.replace("strategy: eagle3", "strategy: dspark"))
    assert "training.strategy 'dspark'" in _fails(["estimate", str(path)])
    path.write_text(OFFLINE_YAML.replace("  seed: 0", "  seed: 0\n  optimizer_cpu_offload: true"))
    assert "training.optimizer_cpu_offload true is not modelled yet" in _fails(["check", str(path)])


@pytest.mark.parametrize("override, named", [
    ("training.batch_size", "'training.batch_size' has no '='"),
    ("=3", "'=3' names no field"),
    ("a.b.c.d=", "'a.b.c.d' does not exist: a is not a key"),
    ("training.batch=2", "did you mean training.batch_size?"),
    ("deployment.disaggregated.backend=mooncake", "deployment.disaggregated is not set in the config"),
    ("run_id.x=1", "run_id is a value, not a section"),
    ("training.batch_size=two", "training.batch_size must be an integer, got 'two'"),
])
def test_malformed_overrides_are_named_with_the_accepted_form(offline, override, named):
    line = _fails(["estimate", "--from-specforge", f"{offline} {override}"])
    assert named in line
    if "has no" in named or "does not exist" in named or "names no" in named:
        assert "accepted: section.field=value" in line


@pytest.mark.parametrize("where, text, named", [
    ("model", "  colour: blue\n", "unknown key model.colour"),
    ("training", "  batch: 2\n", "unknown key training.batch: SpecForge v0.3 refuses keys its schema does not "
                                 "declare; did you mean training.batch_size?"),
])
def test_unknown_keys_are_named(tmp_path, where, text, named):
    path = tmp_path / "run.yaml"
    path.write_text(OFFLINE_YAML.replace(f"{where}:\n", f"{where}:\n{text}", 1))
    assert named in _fails(["estimate", str(path)])


def test_unknown_nested_and_top_level_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(DISAGGREGATED_YAML + "    managed_local:\n      capture_servers:\n        - port: 1\n"
                    "          gpus: [0]\n")
    assert "unknown key deployment.disaggregated.managed_local.capture_servers[0].gpus" in _fails(
        ["estimate", str(path)])
    path.write_text(OFFLINE_YAML + "trainer: {}\n")
    assert "unknown key trainer" in _fails(["estimate", str(path)])


def test_managed_capture_servers_are_warned_about(tmp_path):
    path = tmp_path / "run.yaml"
    managed = """\
    managed_local:
      trainer_cuda_visible_devices: ["2", "3"]
      capture_servers:
        - {port: 30000, cuda_visible_devices: ["0"], tp_size: 1, mem_fraction_static: 0.85}
        - {port: 30001, cuda_visible_devices: ["1"], tp_size: 1}
"""
    text = DISAGGREGATED_YAML.split("    server_urls:")[0] + managed
    path.write_text(text)
    out, err = _estimate([str(path)])
    assert out["config"]["gpus"] == "2xH100"
    assert "capture servers (2 managed, tp 1+1 on 2 GPUs, mem_fraction_static 0.3, 0.85) run the target " \
           "outside this estimate" in err


def test_online_colocated_is_refused_as_specforge_does(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(OFFLINE_YAML.replace("hidden_states_path:", "train_data_path:"))
    assert "needs deployment.mode disaggregated" in _fails(["estimate", str(path)])


def test_legacy_training_keys_are_migrated(tmp_path):
    path = tmp_path / "run.yaml"
    text = DISAGGREGATED_YAML.replace("  mode: disaggregated\n", "")
    text = text.replace("  strategy: eagle3\n", "  strategy: eagle3\n  deployment_mode: disaggregated\n")
    path.write_text(text)
    assert load_spec(path) == DISAGGREGATED_SPEC


def test_a_nonexistent_or_foreign_file_in_from_specforge(tmp_path):
    assert "does not exist" in _fails(["estimate", "--from-specforge", f"{tmp_path}/none.yaml training.seed=1"])
    fitplan_yaml = tmp_path / "a.yaml"
    fitplan_yaml.write_text("model: qwen3-8b\ngpus: 1xH100\n")
    assert "not a SpecForge v0.3 run config" in _fails(
        ["estimate", "--from-specforge", f"{fitplan_yaml} training.batch_size=2"])


# ---------------------------------------------------------------- fitplan's own files are untouched


def test_fitplan_configs_and_plans_are_never_taken_for_specforge_configs():
    assert not is_v03_config({"model": "qwen3-8b", "training": {}})  # a fitplan model is a string
    assert not is_v03_config({"fitplan_plan": 1, "config": {"model": "qwen3-8b"}})
    assert not is_v03_config({"model": {"target_model_path": "x"}})  # no data/training/deployment section
    assert v03_mapping("model: qwen3-8b\nseq: 4096\n") is None
    assert v03_mapping("torchrun scripts/train_eagle3.py --target-model-path Qwen/Qwen3-8B") is None
    assert spec_from_text("model: qwen3-8b\nseq: 2048\n", "a.yaml") == RunSpec(model="qwen3-8b", seq=2048)


def test_a_config_mentioning_train_eagle3_is_not_a_launch_script(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(OFFLINE_YAML.replace("output_dir: ./outputs/", "output_dir: ./train_eagle3/"))
    assert load_spec(path) == OFFLINE_SPEC


def test_check_side_by_side_with_a_fitplan_config(tmp_path, offline):
    mine = tmp_path / "a.yaml"
    mine.write_text("model: qwen3-8b\ngpus: 1xH100\nseq: 4096\n")
    result = CliRunner().invoke(app, ["check", str(mine), str(offline), "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert len(rows) == 2
    assert rows[1]["peak_reserved_bytes"] == estimate_spec(OFFLINE_SPEC).to_json()["peak_reserved_bytes"]
    diff = CliRunner().invoke(app, ["diff", str(mine), str(offline)])
    assert diff.exit_code == 0, diff.output


def test_errors_are_fitplan_errors_in_the_api(offline):
    with pytest.raises(FitplanError, match="unknown key model.bogus"):
        spec_from_text(OFFLINE_YAML.replace("model:\n", "model:\n  bogus: 1\n"), "run.yaml")


def test_fit_answers_a_run_config_in_its_own_keys(offline):
    # B 8 x S 16384 with eager attention (fp32 [B, H, S, S] scores per TTT step) is far over one
    # H100; the ladder's answer must read as overrides of the run config, not launch flags.
    value = f"{offline} training.batch_size=8 data.max_length=16384 training.attention_backend=eager"
    result = CliRunner().invoke(app, ["fit", "--from-specforge", value, "--json"])
    out = json.loads(result.stdout)
    assert out["fits"], result.output
    changes = out["specforge_changes"]
    assert "training.attention_backend=flex_attention" in changes
    assert "training.batch_size=1" in changes and "training.accumulation_steps=8" in changes
    assert not any(c.startswith("--") or " --" in c for c in changes)  # no train_eagle3.py flags


# ---------------------------------------------------------------- fit -o writes the run config back


def _paths(node, prefix=""):
    """Dotted path -> value of every leaf of a mapping."""
    out = {}
    for key, value in node.items():
        where = f"{prefix}.{key}" if prefix else key
        out.update(_paths(value, where) if isinstance(value, dict) else {where: value})
    return out


FAR_OVER = "training.batch_size=8 data.max_length=16384 training.attention_backend=eager"


def test_fit_o_writes_the_run_config_with_the_plans_keys(offline, tmp_path):
    import yaml

    written = tmp_path / "run.fitted.yaml"
    args = ["fit", "--from-specforge", f"{offline} {FAR_OVER}", "--expandable-segments", "-o", str(written)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["plan"]["config"]
    # read back by fitplan (as SpecForge reads it, the launch's allocator setting given alike): the plan's job
    spec = load_spec(written, {"expandable_segments": True})
    assert spec == RunSpec(**{**plan, "aux_layers": None, "global_batch": None})
    assert spec.micro_batch * spec.accum == 8  # the global batch the ladder keeps
    assert estimate_spec(spec).fits
    # exactly the user's keys plus what their overrides and the plan changed: the file says batch 1,
    # flex_attention, no accumulation_steps; the overrides ask for batch 8, eager, 16384 tokens
    original = _paths(yaml.safe_load(OFFLINE_YAML))
    after = _paths(yaml.safe_load(written.read_text()))
    changed = {k for k in after if original.get(k, object()) != after[k]}
    assert set(after) >= set(original)
    assert changed == ({"data.max_length"} | ({"training.accumulation_steps"} if spec.accum != 1 else set())
                       | ({"training.batch_size"} if spec.micro_batch != 1 else set())
                       | ({"training.attention_backend"} if spec.attention != "flex" else set()))
    assert after["data.max_length"] == 16384 and after["training.attention_backend"] == "flex_attention"
    assert after["training.batch_size"] == spec.micro_batch and after.get("training.accumulation_steps", 1) == spec.accum
    assert "fitplan fit from" in written.read_text().splitlines()[0]  # a comment: SpecForge's loader skips it


def test_fit_o_refuses_what_a_run_config_cannot_say(offline, tmp_path):
    written = tmp_path / "run.fitted.yaml"
    # at 21504 tokens the job fits only with expandable segments (as given it is at risk): an
    # environment variable, no run-config key
    needs_expandable = "training.batch_size=1 data.max_length=21504"
    result = CliRunner().invoke(app, ["fit", "--from-specforge", f"{offline} {needs_expandable}", "-o", str(written)])
    assert result.exit_code == 2, result.output
    assert "error: fit -o" in result.output and "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in result.output
    assert "--expandable-segments" in result.output and "Traceback" not in result.output
    assert not written.exists()
    # a fitplan flag that changes what the file says, and that -o does not translate
    result = CliRunner().invoke(app, ["fit", str(offline), "--model", "llama-3.1-8b", "-o", str(written)])
    assert result.exit_code == 2 and "model 'llama-3.1-8b': given as fitplan flags" in result.output
    assert not written.exists()


def test_fit_o_keeps_writing_plans_for_fitplan_jobs(tmp_path):
    written = tmp_path / "plan.yaml"
    result = CliRunner().invoke(app, ["fit", "--model", "llama-3.2-1b", "-o", str(written)])
    assert result.exit_code == 0, result.output
    assert written.read_text().startswith("fitplan_plan: 1")
