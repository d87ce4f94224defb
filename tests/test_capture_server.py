"""Managed SGLang capture servers of a SpecForge v0.3 run (fitplan/estimator/capture_server.py).

Every expected number is worked out by hand below from qwen3-8b's shape (hidden 4096, layers 36,
heads 32, kv_heads 8, head_dim 128, intermediate 12288, vocab 151936, untied embeddings) and the
H100's torch total (profiles: 85,017,493,504 B = 79.18 GiB). It checks the model of SGLang's
documented sizing is carried out as written; nothing here is a measurement of SGLang.
"""

import json

from typer.testing import CliRunner

from fitplan.cli import app

H100_TOTAL = 85_017_493_504  # 79.18 GiB

# qwen3-8b weights, bf16: embed + lm_head 2 x 151936 x 4096 = 1,244,659,712 params; per layer
# q, o 2 x 4096^2 + k, v 2 x 4096 x 1024 = 41,943,040, MLP 3 x 4096 x 12288 = 150,994,944, norms
# 2 x 4096 + q/k norms 2 x 128 = 8,448 -> 192,946,432 x 36 = 6,946,071,552; final norm 4,096.
PARAMS = 2 * 151936 * 4096 + 36 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 12288 + 2 * 4096 + 2 * 128) + 4096
WEIGHTS = 2 * PARAMS
assert WEIGHTS == 16_381_470_720
# KV bytes per token at tp 1: layers 36 x (K, V) 2 x kv_heads 8 x head_dim 128 x 2 B
KV_PER_TOKEN = 36 * 2 * 8 * 128 * 2
assert KV_PER_TOKEN == 147_456
# context length: data.max_length 8192 + 7
CONTEXT = 8192 + 7
# activations at tp 1 per token, bf16: residual/normed/output 3h + q and o 2 x 32 x 128 + k and v
# 2 x 8 x 128 + MLP 3 x 12288 = 59,392 values; captured aux [3h] + last hidden [h] = 16,384 values
ACTIVATIONS = 2 * (3 * 4096 + 2 * 32 * 128 + 2 * 8 * 128 + 3 * 12288) * CONTEXT + 2 * 4 * 4096 * CONTEXT
# outside the allocator: the CUDA context 554,500,096 B + first kernels 76 MiB (runtime.py)
OUTSIDE = 554_500_096 + 76 * 2**20

HEAD = """\
model:
  target_model_path: Qwen/Qwen3-8B
  draft_model_config: configs/qwen3-8b-eagle3.json
  vocab_mapping_path: cache/vocab_mapping/qwen3-8b.pt
  sglang_mem_fraction_static: 0.3
{model_extra}data:
  train_data_path: ./cache/dataset/sharegpt_train.jsonl
  max_length: 8192
training:
  strategy: eagle3
  batch_size: 2
  accumulation_steps: 4
  ttt_length: 6
  attention_backend: fa
deployment:
  mode: disaggregated
  trainer:
    nnodes: 1
    nproc_per_node: 2
  disaggregated:
    control_dir: outputs/run/control
    consumer_state_dir: outputs/run/consumer-state
    backend: mooncake
"""
MANAGED = """\
    managed_local:
      trainer_cuda_visible_devices: ["4", "5"]
      capture_servers:
"""
EXTERNAL = """\
    server_urls:
      - http://127.0.0.1:30000
    mooncake_metadata_server: http://127.0.0.1:35880/metadata
    mooncake_master_server_addr: 127.0.0.1:35551
"""


def _server(port, devices, fraction=None):
    extra = f", mem_fraction_static: {fraction}" if fraction is not None else ""
    return (f"        - {{port: {port}, cuda_visible_devices: {json.dumps([str(d) for d in devices])}, "
            f"tp_size: {len(devices)}{extra}}}\n")


def _write(tmp_path, servers, model_extra=""):
    path = tmp_path / "run.yaml"
    path.write_text(HEAD.format(model_extra=model_extra) + MANAGED + "".join(servers))
    return path


def _json(path):
    result = CliRunner().invoke(app, ["estimate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), result.stderr


def test_one_tp1_server_at_half_the_gpu(tmp_path):
    out, err = _json(_write(tmp_path, [_server(30000, [0], 0.5)]))
    assert "trainer GPUs; they are estimated separately" in err
    assert out["config"]["gpus"] == "2xH100"  # the trainer keys are unchanged
    server = out["server"]
    assert server["gpus"] == 1 and len(server["groups"]) == 1
    g = server["groups"][0]
    static = int(0.5 * H100_TOTAL)
    assert g["tp"] == 1 and g["mem_fraction_static"] == 0.5 and g["gpus"] == 1
    assert g["components"] == {"target.weights": WEIGHTS, "target.kv_pool": static - WEIGHTS,
                               "target.activations": ACTIVATIONS}
    assert g["kv_pool_tokens"] == (static - WEIGHTS) // KV_PER_TOKEN == 177_186
    assert g["gpu_total_bytes"] == H100_TOTAL
    assert g["peak_reserved_bytes"] == static + ACTIVATIONS + OUTSIDE
    assert g["fits"] is True and g["verdict"] == "FITS"
    assert server["peak_reserved_bytes"] == g["peak_reserved_bytes"] and server["fits"] is True


def test_a_fraction_too_small_for_the_weights_is_oom(tmp_path):
    # 0.15 x 79.18 GiB = 11.88 GiB < 15.26 GiB of weights: SGLang refuses to start
    out, _ = _json(_write(tmp_path, [_server(30000, [0], 0.15)]))
    g = out["server"]["groups"][0]
    assert g["fits"] is False and g["verdict"] == "OOM" and out["server"]["fits"] is False
    assert g["components"]["target.kv_pool"] == 0 and g["kv_pool_tokens"] == 0
    assert "does not hold the target weights" in g["reason"] and "refuses to start" in g["reason"]
    assert g["peak_reserved_bytes"] == WEIGHTS + ACTIVATIONS + OUTSIDE  # max(static, weights + 0)


def test_max_total_tokens_caps_the_pool(tmp_path):
    out, _ = _json(_write(tmp_path, [_server(30000, [0], 0.5)], "  sglang_max_total_tokens: 100000\n"))
    g = out["server"]["groups"][0]
    assert g["components"]["target.kv_pool"] == 100_000 * KV_PER_TOKEN and g["kv_pool_tokens"] == 100_000
    assert g["peak_reserved_bytes"] == int(0.5 * H100_TOTAL) + ACTIVATIONS + OUTSIDE and g["fits"]
    # a pool smaller than one request of 8199 tokens: nothing can be scheduled
    out, _ = _json(_write(tmp_path, [_server(30000, [0], 0.5)], "  sglang_max_total_tokens: 4096\n"))
    g = out["server"]["groups"][0]
    assert g["kv_pool_tokens"] == 4096 and g["fits"] is False
    assert "requests cannot be scheduled" in g["reason"]


def test_servers_group_by_tp_and_fraction(tmp_path):
    # two at 0.5, one inheriting model.sglang_mem_fraction_static 0.3, one tp-2 at 0.3
    out, _ = _json(_write(tmp_path, [_server(30000, [0], 0.5), _server(30001, [1]), _server(30002, [2], 0.5),
                                     _server(30003, [6, 7])]))
    server = out["server"]
    assert server["gpus"] == 5
    kinds = [(g["tp"], g["mem_fraction_static"], g["servers"], g["gpus"]) for g in server["groups"]]
    assert kinds == [(1, 0.5, 2, 2), (1, 0.3, 1, 1), (2, 0.3, 1, 2)]
    tp1, tp2 = server["groups"][1], server["groups"][2]
    static = int(0.3 * H100_TOTAL)
    assert tp1["components"]["target.kv_pool"] == static - WEIGHTS
    # tp 2: half the weights, 4 KV heads per GPU, the attention and MLP split, NCCL outside
    assert tp2["components"]["target.weights"] == WEIGHTS // 2
    assert tp2["kv_bytes_per_token"] == 36 * 2 * 4 * 128 * 2
    assert tp2["components"]["target.kv_pool"] == static - WEIGHTS // 2
    act2 = 2 * (3 * 4096 + 2 * 16 * 128 + 2 * 4 * 128 + 3 * 6144) * CONTEXT + 2 * 4 * 4096 * CONTEXT
    assert tp2["components"]["target.activations"] == act2
    assert tp2["outside_allocator_bytes"] == OUTSIDE + 840 * 2**20 + 92 * 2**20
    # the top-level figures are the worst group's (the 0.5 one's peak is highest)
    assert server["peak_reserved_bytes"] == max(g["peak_reserved_bytes"] for g in server["groups"])


def test_offline_and_external_runs_have_no_server_key(tmp_path):
    external = tmp_path / "external.yaml"
    external.write_text(HEAD.format(model_extra="") + EXTERNAL)
    out, err = _json(external)
    assert "server" not in out and "outside this estimate" in err and "not estimated yet" in err
    offline = tmp_path / "offline.yaml"
    offline.write_text((HEAD.format(model_extra="") + MANAGED + _server(30000, [0], 0.5))
                       .replace("train_data_path: ./cache/dataset/sharegpt_train.jsonl",
                                "hidden_states_path: ./cache/hidden_states"))
    out, _ = _json(offline)
    assert "server" not in out


def test_table_prints_the_capture_servers_block(tmp_path):
    path = _write(tmp_path, [_server(30000, [0], 0.5), _server(30001, [1], 0.15)])
    result = CliRunner().invoke(app, ["estimate", str(path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert "Per-GPU memory" in text and text.index("Per-GPU memory") < text.index("capture servers")
    assert "not calibrated against a measurement" in text
    assert "1 GPU (1 server, tp 1, mem_fraction_static 0.5): weights 15.26, KV pool 24.33 (177186 tokens)" in text
    assert "FITS with" in text and "OOM: mem_fraction_static 0.15" in text
