"""`fitplan fit` changes a SpecForge v0.3 run's managed capture servers until they fit
(fitplan/server_fit.py), in the run config's own keys.

Expected numbers are worked out by hand below from the profiles' shapes and the H100's torch total
(85,017,493,504 B); they check that the search applies SGLang's documented sizing
(docs/estimate.md, "Capture servers") as written, not that the sizing is right.
"""

from __future__ import annotations

import json
import math

import yaml
from typer.testing import CliRunner

from fitplan.cli import app

H100_TOTAL = 85_017_493_504
MIB = 2**20
SERVERS = "deployment.disaggregated.managed_local.capture_servers"
# outside the allocator, runtime.py's measured constants: CUDA context + first kernels (76 MiB),
# and with a TP group NCCL's first collective (840 MiB) and the kernels after it (92 MiB)
OUTSIDE_TP1 = 554_500_096 + 76 * MIB
OUTSIDE_TP2 = OUTSIDE_TP1 + 840 * MIB + 92 * MIB

# Llama-3.1-70B (hidden 8192, 80 layers, 64 heads, 8 KV heads, head_dim 128, intermediate 28672,
# vocab 128256, untied): embed + lm_head 2 x 128256 x 8192; per layer q, o 2 x 8192^2, k, v
# 2 x 8192 x 1024, MLP 3 x 8192 x 28672, 2 norms; final norm -> 70.55e9 params, 141.1 GB in bf16,
# more than a whole 80 GB H100 at tp 1 whatever mem_fraction_static says.
PARAMS_70B = 2 * 128256 * 8192 + 80 * (2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192) + 8192
assert PARAMS_70B == 70_553_706_496
WEIGHTS_70B = 2 * PARAMS_70B
assert WEIGHTS_70B > H100_TOTAL
CONTEXT_2048 = 2048 + 7  # SpecForge's --context-length: data.max_length + 7

LLAMA_70B = """\
model:
  target_model_path: meta-llama/Llama-3.1-70B-Instruct
  sglang_mem_fraction_static: {fraction}
{model_extra}data:
  train_data_path: ./cache/dataset/sharegpt_train.jsonl
  max_length: {max_length}
training:
  strategy: eagle3
  batch_size: 1
deployment:
  mode: disaggregated
  trainer:
    nnodes: 1
    nproc_per_node: 1
  disaggregated:
    control_dir: outputs/run/control
    backend: mooncake
    managed_local:
      trainer_cuda_visible_devices: ["0"]
      capture_servers:
"""


def _server(port, devices, fraction=None):
    extra = f", mem_fraction_static: {fraction}" if fraction is not None else ""
    return (f"        - {{port: {port}, cuda_visible_devices: {json.dumps([str(d) for d in devices])}, "
            f"tp_size: {len(devices)}{extra}}}\n")


def _config(tmp_path, servers, model="meta-llama/Llama-3.1-70B-Instruct", fraction=0.9, max_length=2048,
            model_extra="", name="run.yaml"):
    path = tmp_path / name
    text = LLAMA_70B.format(fraction=fraction, max_length=max_length, model_extra=model_extra)
    path.write_text(text.replace("meta-llama/Llama-3.1-70B-Instruct", model) + "".join(servers))
    return path


def _fit(*args):
    result = CliRunner().invoke(app, ["fit", *map(str, args), "--gpus", "H100", "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result, (json.loads(result.stdout) if result.stdout.strip().startswith("{") else None)


def test_a_70b_server_on_one_h100_gets_tp_2_from_a_free_gpu(tmp_path):
    result, out = _fit(_config(tmp_path, [_server(30000, [1])]))
    assert result.exit_code == 0, result.output
    # tp 2 on GPUs 1 and 2: GPU 0 trains, 2 is the lowest GPU of the 8-GPU node no one lists
    assert out["server_changes"] == [f"{SERVERS}=[{{port: 30000, cuda_visible_devices: ['1', '2'], tp_size: 2}}]"]
    assert out["server_edits"] == [f"{SERVERS}[0].tp_size=2", f"{SERVERS}[0].cuda_visible_devices=['1', '2']"]
    assert out["server_fits"] is True and out["server_problems"] == []
    # at tp 2, mem_fraction_static 0.9 as given: weights 70.55 GB per GPU, the static share
    # 0.9 x 85.02 GB = 76.52 GB leaves a 5.96 GB pool of 163,840 B per token (80 layers x K, V x
    # 4 KV heads x 128 x 2 B) = 36,389 tokens, more than one request of 2055
    g = out["server"]["groups"][0]
    static = int(0.9 * H100_TOTAL)
    assert g["tp"] == 2 and g["mem_fraction_static"] == 0.9 and g["gpus"] == 2
    assert g["components"]["target.weights"] == WEIGHTS_70B // 2
    assert g["kv_pool_tokens"] == (static - WEIGHTS_70B // 2) // (80 * 2 * 4 * 128 * 2) == 36_389
    # prefill per token at tp 2: 3h + q, o 2 x 32 x 128 + k, v 2 x 4 x 128 + MLP 3 x 28672 / 2;
    # captured aux + last hidden 4h; bf16
    act = 2 * (3 * 8192 + 2 * 32 * 128 + 2 * 4 * 128 + 3 * 28672 // 2) * CONTEXT_2048 + 2 * 4 * 8192 * CONTEXT_2048
    peak = static + act + OUTSIDE_TP2
    assert g["peak_reserved_bytes"] == peak
    assert peak <= 0.95 * H100_TOTAL  # 92.4% of the GPU: the 5% margin holds
    # the trainer's answer is unchanged: the draft fits one H100 as given
    assert out["fits"] is True and out["specforge_changes"] == []


def test_the_table_says_what_changed_and_why(tmp_path):
    result = CliRunner().invoke(app, ["fit", str(_config(tmp_path, [_server(30000, [1])])), "--gpus", "H100"],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Capture servers: capture_servers[0] (tp_size 1, mem_fraction_static 0.9: the weights (131.42 GiB per GPU)" \
        in text
    assert "tp_size 1 -> 2 with GPU 2 added to cuda_visible_devices" in text and "8-GPU node, assumed" in text
    assert "2 GPUs (1 server, tp 2, mem_fraction_static 0.9)" in text and "FITS with" in text
    assert f"{SERVERS}=[{{port: 30000" in text


def test_several_servers_take_free_gpus_in_order(tmp_path):
    result, out = _fit(_config(tmp_path, [_server(30000, [1]), _server(30001, [2])]))
    assert result.exit_code == 0, result.output
    listed = yaml.safe_load(out["server_changes"][0].split("=", 1)[1])
    assert [(s["tp_size"], s["cuda_visible_devices"]) for s in listed] == [(2, ["1", "3"]), (2, ["2", "4"])]
    assert out["server"]["gpus"] == 4 and out["server_fits"]


# Qwen3-8B (test_capture_server.py's hand count): 16,381,470,720 B of bf16 weights, 147,456 B of KV
# per token at tp 1; a request of data.max_length 8192 + 7 tokens; per token of prefill 59,392 bf16
# values, captured 4 x 4096.
WEIGHTS_8B = 16_381_470_720
KV_8B = 36 * 2 * 8 * 128 * 2
CONTEXT_8192 = 8192 + 7
ACT_8B = 2 * (3 * 4096 + 2 * 32 * 128 + 2 * 8 * 128 + 3 * 12288) * CONTEXT_8192 + 2 * 4 * 4096 * CONTEXT_8192
# The largest hundredth F with F x total + activations + outside <= 95% of the GPU (fit's 5% margin):
# the peak of a server that starts is its static share plus what runs beside it.
F_MAX_8B = math.floor(100 * (0.95 * H100_TOTAL - ACT_8B - OUTSIDE_TP1) / H100_TOTAL) / 100
assert F_MAX_8B == 0.92
assert (int(F_MAX_8B * H100_TOTAL) - WEIGHTS_8B) // KV_8B >= CONTEXT_8192  # the smaller pool still holds a request


def test_a_fraction_too_high_is_lowered_in_the_server_entry(tmp_path):
    # 0.99 x 79.18 GiB + prefill + runtime is more than the GPU
    path = _config(tmp_path, [_server(30000, [1], 0.99)], model="Qwen/Qwen3-8B", fraction=0.3, max_length=8192)
    result, out = _fit(path)
    assert result.exit_code == 0, result.output
    listed = yaml.safe_load(out["server_changes"][0].split("=", 1)[1])
    assert listed == [{"port": 30000, "cuda_visible_devices": ["1"], "tp_size": 1, "mem_fraction_static": F_MAX_8B}]
    assert out["server_edits"] == [f"{SERVERS}[0].mem_fraction_static={F_MAX_8B}"]
    g = out["server"]["groups"][0]
    assert g["tp"] == 1 and g["peak_reserved_bytes"] == int(F_MAX_8B * H100_TOTAL) + ACT_8B + OUTSIDE_TP1


def test_an_inherited_fraction_is_lowered_at_the_model_key(tmp_path):
    # the server takes model.sglang_mem_fraction_static: that one key is the answer, no list rewrite
    path = _config(tmp_path, [_server(30000, [1])], model="Qwen/Qwen3-8B", fraction=0.99, max_length=8192)
    result, out = _fit(path)
    assert result.exit_code == 0, result.output
    assert out["server_changes"] == [f"model.sglang_mem_fraction_static={F_MAX_8B}"]


def test_a_token_cap_below_one_request_is_raised_to_one_request(tmp_path):
    path = _config(tmp_path, [_server(30000, [1], 0.5)], model="Qwen/Qwen3-8B", max_length=8192,
                   model_extra="  sglang_max_total_tokens: 4096\n")
    result, out = _fit(path)
    assert result.exit_code == 0, result.output
    assert out["server_changes"] == [f"model.sglang_max_total_tokens={CONTEXT_8192}"]
    assert out["server"]["groups"][0]["kv_pool_tokens"] == CONTEXT_8192


def test_a_server_that_fits_gets_no_changes(tmp_path):
    path = _config(tmp_path, [_server(30000, [1], 0.5)], model="Qwen/Qwen3-8B", max_length=8192)
    result, out = _fit(path)
    assert result.exit_code == 0, result.output
    assert out["server_changes"] == [] and out["server_edits"] == [] and out["server_fits"] is True
    g = out["server"]["groups"][0]
    assert (g["tp"], g["mem_fraction_static"]) == (1, 0.5)


def test_nothing_fits_when_the_node_has_no_free_gpu(tmp_path):
    path = _config(tmp_path, [_server(30000, [1])])
    written = tmp_path / "run.fitted.yaml"
    result, out = _fit(path, "--node-gpus", 2, "-o", written)
    assert result.exit_code == 1, result.output
    assert out["server_fits"] is False and out["server_changes"] == []
    problem = out["server_problems"][0]
    assert problem.startswith("capture_servers[0] (tp_size 1, mem_fraction_static 0.9)")
    assert "no mem_fraction_static in 0.01-1.00 fits at tp_size 1" in problem
    assert "tp_size 2 would fit but needs 1 more GPU; 0 are listed by no trainer or server on the 2-GPU node" in problem
    assert not written.exists()  # nothing is written unless the whole answer is valid
    result = CliRunner().invoke(app, ["fit", str(path), "--gpus", "H100", "--node-gpus", "2", "-o", str(written)],
                                env={"COLUMNS": "250"})
    assert result.exit_code == 1 and "Capture servers: nothing fits" in result.stdout
    assert "nothing written to" in result.stdout and not written.exists()


def test_nothing_fits_a_405b_server_on_one_h100_node(tmp_path):
    # 405B in bf16 is ~810 GB: ~101 GB per GPU even at tp 8, more than an H100; and tp 8 would
    # need 7 more GPUs where 6 are free
    path = _config(tmp_path, [_server(30000, [1])], model="llama-3.1-405b")
    result, out = _fit(path)
    assert result.exit_code == 1, result.output
    problem = out["server_problems"][0]
    assert "nor at tp_size 2; nor at tp_size 4; nor at tp_size 8" in problem


def test_gpus_named_by_uuid_cannot_be_added(tmp_path):
    path = _config(tmp_path, [_server(30000, ["GPU-5f0c"])])
    result, out = _fit(path)
    assert result.exit_code == 1, result.output
    assert "tp_size 2 would fit with 1 more GPU, which fitplan cannot name" in out["server_problems"][0]


def test_fit_o_writes_the_servers_and_reads_back_as_fitting(tmp_path):
    path = _config(tmp_path, [_server(30000, [1])])
    written = tmp_path / "run.fitted.yaml"
    result, out = _fit(path, "-o", written)
    assert result.exit_code == 0, result.output
    before, after = yaml.safe_load(path.read_text()), yaml.safe_load(written.read_text())
    servers = after["deployment"]["disaggregated"]["managed_local"]["capture_servers"]
    assert servers == [{"port": 30000, "cuda_visible_devices": ["1", "2"], "tp_size": 2}]
    # nothing else changed
    after["deployment"]["disaggregated"]["managed_local"]["capture_servers"] = \
        before["deployment"]["disaggregated"]["managed_local"]["capture_servers"]
    assert after == before
    assert "capture_servers=[{port: 30000" in written.read_text().splitlines()[0]  # the header comment
    # read back: the servers fit, and fit has nothing more to change
    estimate = CliRunner().invoke(app, ["estimate", str(written), "--gpus", "H100", "--json"])
    assert estimate.exit_code == 0, estimate.output
    assert json.loads(estimate.stdout)["server"]["fits"] is True
    result, again = _fit(written)
    assert result.exit_code == 0 and again["server_changes"] == [] and again["server_fits"]


def test_jobs_without_managed_servers_have_no_server_keys(tmp_path):
    result = CliRunner().invoke(app, ["fit", "--model", "llama-3.2-1b", "--json"])
    assert result.exit_code == 0, result.output
    assert not any(key.startswith("server") for key in json.loads(result.stdout))
