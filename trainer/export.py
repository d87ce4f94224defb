"""The aux layers of an exported draft, in the numbering each serving engine reads.

fitplan's aux layer i is the OUTPUT of target decoder layer i: trainer/target.py hooks the
forward of `layers[i]` and keeps what it returns, which is transformers'
`output_hidden_states[i + 1]` (entry 0 is the embedding output).

The engines number the same residual stream differently, and read different keys:

- vLLM reads the draft's top-level `eagle_aux_hidden_state_layer_ids`
  (`get_eagle3_aux_layers_from_config` in its Eagle3 helpers, or `update_eagle3` for a
  speculators-format config) and hands it to the target's `set_aux_hidden_state_layers`
  unchanged. The target's decoder loop (`LlamaModel.forward` in llama.py, and its siblings)
  saves `hidden_states + residual` just BEFORE running layer k when k is listed: id k is the
  input of layer k, i.e. `output_hidden_states[k]`. Our layer i is therefore vLLM's i + 1.
  speculators numbers layers the same way (it collects its training states through vLLM with
  this key, and its DFlash converter says so when it shifts z-lab's ids by one), so a
  speculators Eagle3 config carries the same i + 1.
- SGLang reads the nested `eagle_config.eagle_aux_hidden_state_layer_ids` (`ModelRunner.__init__`)
  and passes it to the target's `set_eagle3_layers_to_capture`, which adds 1 to every id before
  its decoder loop (`LlamaModel.forward`) saves the input of each listed layer. The input of
  layer i + 1 is the output of layer i: SGLang's key holds our i unchanged.

Both keys are written. Without the top-level one, vLLM captures the target's default layers
(ids 2, n/2, n - 3) whatever the draft was trained on, and the vLLM plugins that fall back to
the nested key (vllm-ascend's and vllm-rbln's model runners) read it in vLLM's numbering, one
layer below each trained one: silently worse drafts either way, no error.

The last target layer (i = n - 1, so vLLM n and SGLang n): the engine must capture the final
layer's output before the final norm. Model files whose loop only saves layer inputs never
reach id n; the draft's fc then gets fewer than three states and refuses to run (a shape
error, not a silent miss).
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import pairwise

from fitplan.errors import FitplanError

VLLM_KEY = "eagle_aux_hidden_state_layer_ids"  # top level of config.json (vLLM, speculators)
SGLANG_SECTION = "eagle_config"  # config.json["eagle_config"][VLLM_KEY] (SGLang)


def checked(layers: Iterable[int]) -> tuple[int, ...]:
    """The aux layers, refused unless they are distinct non-negative ints in increasing order."""
    out = tuple(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in out):
        raise FitplanError(f"aux layers {list(out)}: each must be a target layer index, 0 or more")
    if any(a >= b for a, b in pairwise(out)):
        raise FitplanError(f"aux layers {list(out)} must be distinct and in increasing order")
    return out


def vllm_aux_ids(layers: Iterable[int]) -> list[int]:
    """vLLM's and speculators' ids: the input of layer i + 1 is the output of our layer i."""
    return [i + 1 for i in checked(layers)]


def sglang_aux_ids(layers: Iterable[int]) -> list[int]:
    """SGLang's ids: it adds the 1 itself (set_eagle3_layers_to_capture), so ours as they are."""
    return list(checked(layers))


def aux_layers_from_hf(cfg: dict) -> tuple[int, ...]:
    """fitplan's aux layers from an exported config.json: SGLang's key, which must agree with
    vLLM's where both are present; a config with only vLLM's key is read one lower."""
    section = cfg.get(SGLANG_SECTION)
    nested = section.get(VLLM_KEY) if isinstance(section, dict) else None
    top = cfg.get(VLLM_KEY)
    if nested is None and top is None:
        raise FitplanError(f"the draft config names no aux layers (neither {SGLANG_SECTION}.{VLLM_KEY} nor {VLLM_KEY})")
    if nested is None:
        return checked(i - 1 for i in _ints(top, VLLM_KEY))
    layers = checked(_ints(nested, f"{SGLANG_SECTION}.{VLLM_KEY}"))
    if top is not None and list(_ints(top, VLLM_KEY)) != vllm_aux_ids(layers):
        raise FitplanError(
            f"the draft config's aux layers disagree: {SGLANG_SECTION}.{VLLM_KEY} {list(layers)} (SGLang's numbering) "
            f"needs {VLLM_KEY} {vllm_aux_ids(layers)} (vLLM's, one higher), not {list(top)}"
        )
    return layers


def _ints(value, key: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise FitplanError(f"draft config {key}: {value!r} is not a list of layer indices")
    return value
