"""`fitplan estimate` / `fitplan profiles` through the real typer app: output, JSON, exit codes."""

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from fitplan.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, list(args))


def test_estimate_table_and_verdict():
    r = run("estimate", "--model", "gpt-oss-120b", "--gpus", "8xH100")
    assert r.exit_code == 0, r.output
    assert "target.weights" in r.output and "logits.target" in r.output
    assert any(verdict in r.output for verdict in ("FITS with", "OOM by", "AT RISK:"))
    assert "largest allocation" in r.output


@pytest.mark.parametrize("args,attention", [
    (["--seq", "2048"], "flex"), (["--seq", "4096"], "split"), (["--seq", "8192", "--attention", "flex"], "flex"),
    (["--seq", "4096", "--runtime", "specforge"], "flex"), (["--seq", "4096", "--workload", "sft"], "sdpa"),
])
def test_estimate_names_the_attention_it_resolved(args, attention):
    """Its default depends on the workload, the runtime and the length: the table says which ran."""
    r = run("estimate", "--model", "llama-3.1-8b", "--gpus", "1xH200", *args)
    assert r.exit_code == 0, r.output
    assert f"attention: {attention}\n" in r.output
    data = json.loads(run("estimate", "--model", "llama-3.1-8b", "--gpus", "1xH200", *args, "--json").stdout)
    assert data["layout"]["attention"] == attention


@pytest.mark.parametrize("gpus,attention", [("1xH100", "split"), ("8xH200", "split"), ("1xA100-80GB", "flex"),
                                             ("1xL40S", "flex"), ("1xB200", "flex"), ("1xMI300X", "flex")])
def test_the_split_attention_is_the_default_on_hopper_only(gpus, attention):
    """Measured faster than flex on an H200 with cuDNN's causal kernel; before Hopper the trainer's
    causal kernel is FlashAttention-2, slower than flex; Blackwell and AMD unmeasured."""
    data = json.loads(run("estimate", "--model", "llama-3.1-8b", "--gpus", gpus, "--seq", "8192", "--json").stdout)
    assert data["layout"]["attention"] == attention


def test_estimate_oom_names_dominant_component():
    r = run("estimate", "--model", "qwen3-8b", "--gpus", "8xH100", "--tp", "8", "--runtime", "specforge",
            "--seq", "8192")
    assert r.exit_code == 0, r.output
    assert "OOM by" in r.output and "logits.target dominates" in r.output


def test_json_is_one_object_with_config(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("model: llama-3.1-8b\ngpus: 1xH200\nworkload: sft\nseq: 8192\nac: true\nprecision: bf16\n")
    r = run("estimate", str(cfg), "--json", "--micro-batch", "2")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)  # the whole output parses: nothing else was printed
    assert data["config"]["micro_batch"] == 2  # the flag overrides the file
    assert data["config"]["seq"] == 8192
    assert data["peak_phase"] in data["phases"]


def test_seq_above_max_warns():
    r = run("estimate", "--model", "llama-3.2-1b", "--gpus", "1xH100", "--seq", "200000", "--workload", "sft",
            "--ac")
    assert r.exit_code == 0
    assert "exceeds" in r.output and "max_position_embeddings" in r.output


def test_plot_writes_png(tmp_path):
    out = tmp_path / "breakdown.png"
    r = run("estimate", "--model", "llama-3.2-1b", "--gpus", "1xH100", "--plot", str(out))
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profiles_lists_models_drafts_gpus():
    r = run("profiles")
    assert r.exit_code == 0, r.output
    for name in ("llama-3.1-8b", "gpt-oss-120b", "H100-SXM-80GB", "Eagle3 drafts"):
        assert name in r.output


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--model", "lama-3.1-8b"], "did you mean llama-3.1-8b"),
        (["--model", "llama-3.1-8b", "--gpus", "8xH1O0"], "unknown GPU"),
        (["--model", "llama-3.1-8b", "--gpus", "8xB9000"], "unknown GPU"),
        (["--model", "llama-3.1-8b", "--seq", "0"], "seq must be a positive integer"),
        (["--model", "llama-3.1-8b", "--micro-batch", "-2"], "micro_batch must be a positive integer"),
        (["--model", "llama-3.1-8b", "--gpus", "8xH100", "--tp", "3"], "tp 3 does not divide"),
        (["--model", "qwen2.5-7b", "--gpus", "8xH100", "--tp", "8"], "does not divide the 28 attention heads"),
        (["--model", "llama-3.1-8b", "--gpus", "2xH100", "--global-batch", "8", "--accum", "3"], "contradict"),
        (["--model", "llama-3.1-8b", "--workload", "sft", "--output-sharding", "all-to-all"], "all-to-all"),
        (["--model", "llama-3.1-8b", "--precision", "fp8"], "precision 'fp8' is not one of"),
        (["--model", "llama-3.1-8b", "--target-weights", "mxfp4"], "no MXFP4"),
        (["--model", "gpt-oss-20b", "--target-weights", "mxfp4"], "trainer does not run it yet"),
    ],
)
def test_bad_flags_one_line_exit_2(args, needle):
    r = run("estimate", *args)
    assert r.exit_code == 2, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_unknown_yaml_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("model: llama-3.1-8b\nmicrobatch: 2\n")
    r = run("estimate", str(cfg))
    assert r.exit_code == 2 and "unknown key(s) microbatch" in r.output


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ('{"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 100}', "missing required field(s) num_attention_heads"),
        ('{"hidden_size": 0, "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 100}', "must be positive"),
    ],
)
def test_bad_model_config_json(tmp_path, content, needle):
    path = tmp_path / "config.json"
    path.write_text(content)
    r = run("estimate", "--model", str(path))
    assert r.exit_code == 2, r.output
    assert needle in r.output and len(r.output.strip().splitlines()) == 1


def test_model_directory_with_config_json(tmp_path):
    cfg = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
           "vocab_size": 1000, "intermediate_size": 512, "model_type": "llama", "unknown_field": [1, 2]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    r = run("estimate", "--model", str(tmp_path), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["fits"] is True


def test_estimate_path_never_imports_torch():
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from fitplan.cli import app
        r = CliRunner().invoke(app, ["estimate", "--model", "gpt-oss-120b", "--gpus", "8xH100", "--json"])
        assert r.exit_code == 0, r.output
        heavy = sorted(m for m in ("torch", "transformers", "matplotlib") if m in sys.modules)
        print(",".join(heavy))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
