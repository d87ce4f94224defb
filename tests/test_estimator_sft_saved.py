"""sft activation terms against what autograd really saves in transformers' decoder (CPU).

The estimator's `activations.model` (plus the fp32 log-softmax of the loss, counted under
`logits.model`) must equal the bytes of the distinct non-parameter storages that autograd saves
during the forward of a tiny bf16 model with SDPA, recorded with saved_tensors_hooks.
"""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fitplan.config import RunSpec  # noqa: E402
from fitplan.estimator import sft_terms  # noqa: E402
from fitplan.layout import resolve  # noqa: E402

TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=176, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, num_hidden_layers=2, vocab_size=256,
                  max_position_embeddings=512),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=160, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, num_hidden_layers=2, vocab_size=300,
                  max_position_embeddings=512),
}


def saved_bytes(model, ids) -> int:
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params)


@pytest.mark.parametrize("family", sorted(TINY))
@pytest.mark.parametrize("batch, seq", [(1, 64), (2, 48)])
def test_saved_activations_match_estimate(tmp_path, family, batch, seq):
    cfg = TINY[family]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    job = resolve(RunSpec(model=str(tmp_path), workload="sft", seq=seq, micro_batch=batch, precision="bf16"))
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq))
    measured = saved_bytes(model, ids)
    log_softmax = 4 * batch * seq * cfg["vocab_size"]  # fp32 [B*S, V], under logits.model
    predicted = sft_terms.activation_bytes(job) + log_softmax
    assert predicted == pytest.approx(measured, rel=0.01, abs=64), (predicted, measured)
