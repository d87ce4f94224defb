"""The analytic estimator against hand calculations and published figures (written out here)."""

import json

import pytest

from fitplan.config import RunSpec
from fitplan.estimator import estimate, estimate_spec
from fitplan.shapes import count_params, weight_bytes
from fitplan.estimator.recipes import TrainedState
from fitplan.estimator import runtime, sft_terms, target_terms
from fitplan.layout import resolve
from fitplan.profiles import _json_files, load_draft, load_model

GIB = 2**30
MIB = 2**20


def job_of(**kw):
    return resolve(RunSpec(**kw))


# ---------------------------------------------------------------- parameter counts


def test_llama_31_8b_param_count_by_hand():
    h, layers, V, I, kv = 4096, 32, 128256, 14336, 8 * 128
    embed_and_head = 2 * V * h  # untied: 1,050,673,152
    attention = h * (h + 2 * kv) + h * h  # q, k, v, o: 41,943,040
    mlp = 3 * h * I  # gate, up, down: 176,160,768
    norms = 2 * h
    total = embed_and_head + layers * (attention + mlp + norms) + h
    assert total == 8_030_261_248  # Meta's published "8B"; exact count
    assert count_params(load_model("llama-3.1-8b")).total == total


def test_qwen25_7b_qkv_biases_counted():
    # 7,615,616,512: the published Qwen2.5-7B parameter count (7.61B in the model card)
    assert count_params(load_model("qwen2.5-7b")).total == 7_615_616_512


def test_gpt_oss_120b_total_and_packed_size():
    m = load_model("gpt-oss-120b")
    c = count_params(m)
    # gpt-oss model card (arXiv:2508.10925): 116.83B total parameters
    assert abs(c.total / 1e9 - 116.83) < 0.01
    # expert weights: 36 layers x 128 experts x 3 x 2880 x 2880
    assert c.expert_weights == 36 * 128 * 3 * 2880 * 2880
    # published checkpoint size: 60.8 GiB with MXFP4 experts (params_stated_breakdown)
    assert abs(weight_bytes(m, packed=True) / GIB - 60.8) < 0.1
    # dequantized: ~218 GiB (docs/estimate.md): 116.83e9 x 2 bytes
    assert abs(weight_bytes(m, packed=False) / GIB - 116.83e9 * 2 / GIB) < 0.1


def test_deepseek_v3_mla_count_matches_published_671b():
    # DeepSeek-V3 README: 671B main-model parameters (MTP module excluded)
    assert abs(count_params(load_model("deepseek-v3")).total / 1e9 - 671.0) < 0.1


@pytest.mark.parametrize("name", sorted(_json_files("drafts")))
def test_draft_param_counts_match_cited_derivations(name):
    """profiles/drafts/*.json derived_param_counts cite SpecForge's LlamaForCausalLMEagle3."""
    profile = json.loads(_json_files("drafts")[name].read_text())
    cited = profile["derived_param_counts"]
    target = next(load_model(m) for m in sorted(_json_files("models")) if load_draft("auto", load_model(m)).name == name)
    draft = load_draft(name, target)
    assert draft.trainable_params() == cited["trainable_excl_frozen_embedding"]
    assert draft.trainable_params() + draft.frozen_params() == cited["total_incl_embedding"]


# ---------------------------------------------------------------- recipes and sharding


@pytest.mark.parametrize(
    "precision, per_param",
    [("mixed", 18), ("fp32-autocast", 16), ("bf16-master", 16), ("bf16", 8)],
)
def test_recipe_bytes_per_param(precision, per_param):
    spec = RunSpec(model="x", precision=precision, sharding="none", split_master=False)
    s = TrainedState(spec, trainable=1000, frozen=0, ranks=1)
    assert s.full_params() + s.full_grads() + s.master() + s.moments() == per_param * 1000


def test_split_masters_by_hand():
    """bf16-master's masters split (the default with AdamW on the GPU): param 2 + grad 2 + low
    bits 2 + moments 8 = 14 B/param, no grad copy; whole again with the 8-bit AdamW or offload."""
    s = TrainedState(RunSpec(model="x", sharding="none"), trainable=1000, frozen=0, ranks=1)
    assert (s.full_params(), s.full_grads(), s.master(), s.moments(), s.grad_copy()) == (2000, 2000, 2000, 8000, 0)
    for whole in ({"optimizer": "adamw-8bit"}, {"split_master": False}):
        w = TrainedState(RunSpec(model="x", sharding="none", **whole), trainable=1000, frozen=0, ranks=1)
        assert (w.master(), w.grad_copy()) == (4000, 4000), whole


def test_bf16_master_grad_copy_and_8bit_moments():
    spec = RunSpec(model="x", precision="bf16-master", sharding="none", split_master=False)
    assert TrainedState(spec, 1000, 0, 1).grad_copy() == 4000
    spec8 = spec.replace(optimizer="adamw-8bit")
    # torchao AdamW8bit: per moment 1 B of code per element + one fp32 scale per 256 elements:
    # 2 moments x (1000 + 1000 * 4 / 256) = 2 x 1015.625 = 2031.25, rounded up to whole bytes
    assert TrainedState(spec8, 1000, 0, 1).moments() == 2032


def test_zero_levels_divide_state_by_ranks():
    base = RunSpec(model="x", precision="bf16-master", split_master=False)
    P, N = 8000, 8
    z1 = TrainedState(base.replace(sharding="zero1"), P, 0, N)
    assert (z1.moments(), z1.master(), z1.full_grads(), z1.params()) == (8 * P // N, 4 * P // N, 2 * P, 2 * P)
    z2 = TrainedState(base.replace(sharding="zero2"), P, 0, N)
    assert (z2.grads(), z2.params()) == (2 * P // N, 2 * P // N)  # FSDP stores shards; gathers for compute
    z3 = TrainedState(base.replace(sharding="zero3"), P, 0, N)
    assert z3.params() == 2 * P // N
    off = TrainedState(base.replace(sharding="zero3", offload="params"), P, 0, N)
    assert (off.params(), off.moments(), off.master()) == (0, 0, 0)


# ---------------------------------------------------------------- eagle3 terms


def test_tp_fold_logits_gather_vs_all_to_all_by_hand():
    kw = dict(model="qwen3-8b", gpus="8xH100", tp=8, seq=4096, micro_batch=1)
    gather = target_terms.logits_bytes(job_of(**kw))
    a2a = target_terms.logits_bytes(job_of(**kw, output_sharding="all-to-all"))
    T_g, V = 8 * 1 * 4096, 151936
    shard = 2 * T_g * V // 8  # this rank's bf16 vocab shard [T_g, V/8]: 1,244,659,712
    assert gather == shard + 2 * T_g * V == 11_201_937_408
    assert a2a == shard + 2 * 4096 * V == 2_489_319_424
    assert gather / a2a == pytest.approx((1 + 8) / 2)  # (1 + tp) / 2


def test_specforge_cascade_is_about_56_gib_for_qwen3_8b_tp8():
    # docs/estimate.md, SpecForge worked example: Qwen3-8B, tp 8, B 1, S 4096: ~56 GiB of logits on every rank (12*T_g*V)
    est = estimate_spec(RunSpec(model="qwen3-8b", gpus="8xH100", tp=8, runtime="specforge"))
    logits = est.phases["target_forward"]["logits.target"]
    assert logits == 12 * 8 * 4096 * 151936
    assert abs(logits / GIB - 56) < 0.5
    sharded = estimate_spec(RunSpec(model="qwen3-8b", gpus="8xH100", tp=8, runtime="specforge",
                                    output_sharding="all-to-all"))
    assert sharded.phases["target_forward"]["logits.target"] * 8 == logits


def test_gpt_oss_120b_gathered_logits_exceed_an_h100():
    # docs/estimate.md, SpecForge worked example: ~74 GiB for gpt-oss-120b (V = 201088) at tp 8 in SpecForge's cascade
    est = estimate_spec(RunSpec(model="gpt-oss-120b", gpus="8xH100", tp=8, runtime="specforge",
                                target_weights="mxfp4"))
    assert est.phases["target_forward"]["logits.target"] == 12 * 8 * 4096 * 201088  # 73.6 GiB
    assert not est.fits
    assert est.dominant_component == "logits.target"
    assert est.largest_allocation_bytes == 4 * 8 * 4096 * 201088  # fp32 [tp*B*S, V]


def test_adam_moments_lazy_step1_vs_steady():
    spec = RunSpec(model="llama-3.1-8b", gpus="1xH100", seq=2048, precision="bf16-master", split_master=False)
    est = estimate_spec(spec)
    P = 424_689_664  # trainable draft params (SpecForge derivation, profiles/drafts/llama3-8b.json)
    for phase in ("target_forward", "draft_forward", "backward"):
        missing = est.phase_allocated(phase) - est.phase_allocated(phase, step1=True)
        assert missing == 12 * P  # fp32 master (4) + Adam moments (8), built in the first step
    # every copy at once: the moments are made before the step, which peaks as the steady one
    all_at_once = estimate_spec(spec.replace(optimizer_per_param=False))
    assert all_at_once.phase_allocated("optimizer_step") == all_at_once.phase_allocated("optimizer_step", step1=True)


def test_stepping_a_parameter_at_a_time_by_hand():
    """llama-3.1-8b's draft (h 4096, I 14336, q 32 x 128 and k, v 8 x 128 over the 2h input, Vd
    32000), stepped smallest first: four norms of 4096, k and v 8,388,608, o 16,777,216, q
    33,554,432, fc 50,331,648, gate, up, down 58,720,256, the lm_head n = 131,072,000. Each
    instant holds the bf16 grads not yet stepped (R elements, 2 B) and one fp32 copy: 2R + 4n is
    highest at q (R = 391,118,848 after the norms, k, v and o): 782,237,696 + 134,217,728 (fc's
    is as high). All at once: 2P + 4P. Step 1 makes the moments as it goes and peaks at the
    lm_head, last, with every moment made and its grad dropped: 12P + 4n. Whole masters: split
    ones make no copy (test_split_masters_step_beside_every_grad)."""
    spec = RunSpec(model="llama-3.1-8b", gpus="1xH100", seq=2048, precision="bf16-master", split_master=False)
    P, n = 424_689_664, 32000 * 4096
    est = estimate_spec(spec).phases["optimizer_step"]
    assert (est["draft.grads"], est["optimizer.grad_copy"]) == (2 * 391_118_848, 4 * 33_554_432)
    assert (est["optimizer.master"], est["optimizer.moments"]) == (4 * P, 8 * P)
    old = estimate_spec(spec.replace(optimizer_per_param=False)).phases["optimizer_step"]
    assert (old["draft.grads"], old["optimizer.grad_copy"]) == (2 * P, 4 * P)
    first = estimate_spec(spec).step1_phases["optimizer_step"]
    assert first.get("draft.grads", 0) == 0 and first["optimizer.grad_copy"] == 4 * n
    assert (first["optimizer.master"], first["optimizer.moments"]) == (4 * P, 8 * P)


def test_split_masters_step_beside_every_grad():
    """Split masters: no copy, so the step holds every bf16 grad (2P) beside the low bits (2P)
    and moments (8P); step 1 makes the low bits and moments at the step, 10P, which the phases
    before it lack."""
    spec = RunSpec(model="llama-3.1-8b", gpus="1xH100", seq=2048)
    P = 424_689_664
    est = estimate_spec(spec)
    step = est.phases["optimizer_step"]
    assert (step["draft.grads"], step["optimizer.master"], step["optimizer.moments"]) == (2 * P, 2 * P, 8 * P)
    assert step.get("optimizer.grad_copy", 0) == 0
    assert est.phase_allocated("backward") - est.phase_allocated("backward", step1=True) == 10 * P


def test_mxfp4_target_weights_per_rank():
    job = job_of(model="gpt-oss-120b", gpus="8xH100", tp=4, target_weights="mxfp4", runtime="specforge")
    packed = 114_661_785_600 * 4.25 / 8 + (116_829_156_672 - 114_661_785_600) * 2
    assert target_terms.weights_per_rank(job) == pytest.approx(packed / 4, abs=1)


def test_outside_allocator_terms_by_hand():
    one = job_of(model="llama-3.1-8b", gpus="1xH100")
    # context + first kernels + compiled flex kernels (760.8 - 618.8 MiB in tests/data/gpu reports)
    assert runtime.outside_allocator_bytes(one) == 554_500_096 + 76 * MIB + 142 * MIB
    sft = job_of(model="llama-3.1-8b", gpus="1xH100", workload="sft")
    assert runtime.outside_allocator_bytes(sft) == 554_500_096 + 76 * MIB  # no compiled kernels
    eight = job_of(model="qwen3-8b", gpus="8xH100", tp=4, output_sharding="all-to-all")
    # world communicator (840 MiB) + a TP group of 4 (486 MiB) + kernels after NCCL init (92 MiB)
    # + the first all-to-all on 4 ranks (1214 MiB)
    expected = 554_500_096 + 76 * MIB + 142 * MIB + 840 * MIB + 486 * MIB + 92 * MIB + 1214 * MIB
    assert runtime.outside_allocator_bytes(eight) == expected


def test_device_peak_adds_reserve_and_outside():
    est = estimate_spec(RunSpec(model="llama-3.2-1b", gpus="1xH100", seq=1024))
    assert est.peak_reserved_bytes == est.peak_allocated_bytes + est.allocator_reserve_bytes + est.outside_allocator_bytes
    # fitplan trainer on one GPU: the replay's reserved bytes less the allocated peak
    assert est.replay is not None
    assert est.allocator_reserve_bytes == est.replay.needed_reserved_bytes - est.peak_allocated_bytes
    # on several GPUs (not replayed), the lean draft: the general 5% of the peak + 256 MiB
    two = estimate_spec(RunSpec(model="llama-3.2-1b", gpus="2xH100", seq=1024))
    assert two.replay is None
    assert two.allocator_reserve_bytes == int(0.05 * two.peak_allocated_bytes + 256 * MIB)
    # the plain draft: 9.7 B x 1024 tokens x 32000 draft vocab (its per-step logits blocks)
    plain = estimate_spec(RunSpec(model="llama-3.2-1b", gpus="2xH100", seq=1024, draft_memory="plain"))
    assert plain.allocator_reserve_bytes == int(9.7 * 1024 * 32000)
    tp4 = estimate_spec(RunSpec(model="qwen3-8b", gpus="4xH200", tp=4, seq=8192, draft_memory="plain"))
    # + (2.5 + 0.75 x 3 extra gathered blocks) x own rows [8192, 151936] bf16
    assert tp4.allocator_reserve_bytes == int(9.7 * 8192 * 32000 + 4.75 * 2 * 8192 * 151936)
    one = estimate_spec(RunSpec(model="llama-3.2-1b", gpus="1xH100", seq=1024, workload="sft"))
    assert one.replay is not None  # sft on one GPU: replayed too
    assert one.allocator_reserve_bytes == one.replay.needed_reserved_bytes - one.peak_allocated_bytes
    # sft on several GPUs (not replayed): 5% + 256 MiB, plus 8.5 B per cached logits entry:
    # 1024 tokens x 128256 vocab
    sft = estimate_spec(RunSpec(model="llama-3.2-1b", gpus="2xH100", seq=1024, workload="sft"))
    assert sft.replay is None
    cached_logits = int(8.5 * 1024 * 128256)
    assert sft.allocator_reserve_bytes == int(0.05 * sft.peak_allocated_bytes) + 256 * MIB + cached_logits
    expandable = estimate_spec(RunSpec(model="llama-3.2-1b", gpus="2xH100", seq=1024, workload="sft",
                                       expandable_segments=True))
    assert expandable.allocator_reserve_bytes == int(0.02 * expandable.peak_allocated_bytes) + 64 * MIB


def test_sft_near_limit_verdicts_come_from_the_replay():
    """qwen3-8b sft b4 ac on one H200 (tests/data/gpu/validation: h200_rows.jsonl): seq 9984 ran;
    8960, 10752 and 12032 failed (the allocator's cache decides, not the tensors alone). The tensors at 9984 (~126 GiB) fit in 139.8 GiB; whether the allocator finds
    room for the fp32 logits upcast (4 x 9984 x 151936 x 4 B = 22.6 GiB per block) is the replay's
    call, no longer a rule of two stranded blocks (which had said "at risk")."""
    spec = RunSpec(model="qwen3-8b", gpus="1xH200", workload="sft", seq=9984, micro_batch=4, ac=True,
                   precision="bf16")
    edge = estimate_spec(spec)
    assert edge.replay is not None and edge.largest_allocation_bytes == 4 * 9984 * 151936 * 4
    assert edge.verdict == "fits"
    # the other measured rows of that sweep: which failed, and the one that ran with expandable segments
    for seq in (8960, 10752, 12032):
        assert not estimate_spec(spec.replace(seq=seq)).fits, seq
    assert not estimate_spec(spec.replace(seq=12032, expandable_segments=True)).fits
    assert estimate_spec(spec.replace(seq=10752, expandable_segments=True)).verdict != "OOM"
    assert estimate_spec(spec.replace(seq=1024)).verdict == "fits"


def test_reserve_squeezes_near_the_limit_by_hand():
    from fitplan.estimator.result import Estimate

    def est(allocated_gib, reserve_gib=20, floor_gib=2, outside_gib=1):
        phases = {"forward": {"x": allocated_gib * GIB}}
        return Estimate(phases=phases, step1_phases=phases, gpu_total_bytes=100 * GIB,
                        allocator_reserve_bytes=reserve_gib * GIB, outside_allocator_bytes=outside_gib * GIB,
                        largest_allocation_bytes=0, largest_allocation_name="x", reserve_floor_bytes=floor_gib * GIB)  # fmt: skip

    roomy = est(50)  # 50 + 20 + 1 = 71 of 100: the whole reserve stays cached
    assert (roomy.peak_reserved_bytes, roomy.required_bytes, roomy.fits) == (71 * GIB, 53 * GIB, True)
    squeezed = est(90)  # needs 90 + 2 + 1 = 93 <= 100: runs with the cache squeezed to 9 GiB
    assert (squeezed.peak_reserved_bytes, squeezed.headroom_bytes, squeezed.fits) == (100 * GIB, 0, True)
    short = est(98)  # needs 98 + 2 + 1 = 101 > 100: out of memory, 1 GiB short
    assert (short.peak_reserved_bytes, short.headroom_bytes, short.fits) == (101 * GIB, -GIB, False)
    assert est(50, floor_gib=30).required_bytes == 71 * GIB  # the floor never exceeds the reserve


def test_verdict_is_at_risk_within_one_stranded_block_of_the_limit_by_hand():
    from fitplan.estimator.result import Estimate

    def est(allocated_gib, stranded_gib):
        phases = {"forward": {"x": allocated_gib * GIB}}
        return Estimate(phases=phases, step1_phases=phases, gpu_total_bytes=100 * GIB,
                        allocator_reserve_bytes=20 * GIB, outside_allocator_bytes=GIB, largest_allocation_bytes=0,
                        largest_allocation_name="x", reserve_floor_bytes=2 * GIB,
                        stranded_block_bytes=stranded_gib * GIB)  # fmt: skip

    assert est(80, 10).verdict == "fits"  # 80 + 2 + 1 + 10 = 93 <= 100
    risky = est(90, 10)  # 90 + 2 + 1 = 93 <= 100 < 103 with a 10 GiB block stranded
    assert (risky.verdict, risky.fits, risky.required_if_fragmented_bytes) == ("at risk", False, 103 * GIB)
    assert not risky.fits_with_margin(0.0)  # the fix ladder does not take a job at risk
    assert est(98, 10).verdict == "OOM"  # 98 + 2 + 1 = 101 > 100 without any stranding
    assert est(90, 0).verdict == "fits"  # expandable segments strand nothing


# ---------------------------------------------------------------- sft


def test_sft_llama_8b_activations_by_hand():
    job = job_of(model="llama-3.1-8b", gpus="1xH200", workload="sft", seq=8192, precision="bf16")
    h, H, Hkv, d, I, layers, S = 4096, 32, 8, 128, 14336, 32, 8192
    T = S  # micro-batch 1
    norm = 4 * h + 4 + 2 * h + 2 * h  # fp32 upcast, fp32 rstd, normalized bf16, output: 32,772
    attention = 2 * H * d + 2 * 2 * Hkv * d + 2 * H * d + 4 * H  # q, k, v, output, fp32 lse: 20,608
    mlp = 8 * I  # 114,688
    per_layer = 2 * norm + attention + mlp  # 200,840 B per token
    once = (norm + 8 + 8) * T + 2 * 2 * S * d  # final norm, int64 ids and labels, rotary cos/sin
    est = estimate(job)
    assert est.phases["forward"]["activations.model"] == per_layer * T * layers + once == 52_921_794_560
    # logits at the loss: bf16 [T, V] + fp32 upcast + fp32 log-softmax = 10 B per entry
    assert est.phases["forward"]["logits.model"] == 10 * T * 128256
    ac = estimate(job_of(model="llama-3.1-8b", gpus="1xH200", workload="sft", seq=8192, precision="bf16", ac=True))
    assert ac.phases["forward"]["activations.model"] == 2 * h * T * layers + once  # layer inputs


def test_sft_backward_logits_by_hand():
    """Start of backward, the model output dropped: saved fp32 log-softmax, its incoming fp32
    gradient and the fp32 gradient of its input, 12 B per [B*S, V] entry (no bf16 logits)."""
    job = job_of(model="llama-3.1-8b", gpus="1xH200", workload="sft", seq=2048, micro_batch=2, precision="bf16")
    assert sft_terms.backward_logits_bytes(job) == 12 * 2 * 2048 * 128256


def test_sft_bf16_state_is_8_bytes_per_param():
    est = estimate_spec(RunSpec(model="llama-3.1-8b", gpus="1xH200", workload="sft", precision="bf16", seq=512))
    step = est.phases["optimizer_step"]
    P = 8_030_261_248
    assert step["model.params"] + step["model.grads"] + step["optimizer.moments"] == 8 * P


def test_sft_zero3_holds_root_and_two_layers_unsharded():
    est = estimate_spec(RunSpec(model="llama-3.1-8b", gpus="8xH100", workload="sft", sharding="zero3",
                                precision="bf16", seq=1024))
    root = 2 * 128256 * 4096 + 4096
    layer = (8_030_261_248 - root) // 32  # 218,112,000
    assert est.phases["forward"]["comm.buffers"] == 2 * (root + 2 * layer)
    assert est.phases["optimizer_step"]["model.params"] == -(-2 * 8_030_261_248 // 8)


def test_json_contract_keys():
    out = estimate_spec(RunSpec(model="llama-3.2-1b", gpus="1xH100")).to_json()
    for key in ("fits", "peak_allocated_bytes", "peak_reserved_bytes", "gpu_total_bytes",
                "largest_allocation_bytes", "peak_phase", "phases", "components"):
        assert key in out
    assert out["fits"] is (out["peak_reserved_bytes"] <= out["gpu_total_bytes"])
    assert set(out["phases"]) == {"load", "target_forward", "draft_forward", "backward", "optimizer_step", "checkpoint"}
    assert out["components"] == out["phase_components"][out["peak_phase"]]


def test_gpt_oss_target_eager_attention_scores_by_hand():
    """gpt-oss has no SDPA path in transformers: eager attention holds 3 bf16 [B, H, S, S+1]
    score tensors plus two bf16 [B, 1, S, S] masks (full and sliding window) at once.
    gpt-oss-20b: 64 heads; B 2, S 4096 -> 3*2*2*64*4096*4097 + 2*2*2*4096*4096 B."""
    job = job_of(model="gpt-oss-20b", gpus="1xH200", seq=4096, micro_batch=2)
    assert target_terms.eager_attention_bytes(job) == 12_888_047_616 + 134_217_728
    est = estimate(job)
    working = est.phases["target_forward"]["target.activations"]
    assert working == target_terms.forward_working_bytes(job) + 13_022_265_344
    # tp 2: the group's 2 micro-batches, half the heads each: the same bytes per rank
    tp2 = job_of(model="gpt-oss-20b", gpus="2xH200", seq=4096, micro_batch=1, tp=2)
    assert target_terms.eager_attention_bytes(tp2) == 3 * 2 * 2 * 32 * 4096 * 4097 + 2 * 2 * 2 * 4096 * 4096
    assert target_terms.eager_attention_bytes(job_of(model="llama-3.1-8b", gpus="1xH200", seq=4096)) == 0
