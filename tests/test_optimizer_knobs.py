"""The optimizer knobs the planner can choose, carried out by the trainer on CPU: `optimizer:
adamw-8bit` (torchao's AdamW8bit) and `offload: optimizer` (trainer/offload.py), with every
precision recipe, checkpoints and the estimator's optimizer term; the knobs it cannot run are
refused before loading (tests/test_job_rules.py holds the one-line refusals of every command).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from fitplan.config import RunSpec  # noqa: E402
from trainer import optim  # noqa: E402
from trainer.loop import run  # noqa: E402
from trainer.offload import HostAdamW  # noqa: E402
from trainer.options import TrainOptions  # noqa: E402

# A draft whose weight matrices all hold >= 4096 elements (a multiple of 256), so torchao
# quantizes their moments; its four norms (256 elements) are below the threshold.
H, I, VD = 256, 512, 256
TARGET = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=H, intermediate_size=I,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512,
    max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
    initializer_range=0.5,
)
DRAFT = dict(hidden_size=H, intermediate_size=I, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
             vocab_size=512, draft_vocab_size=VD)
# Elements of each trainable matrix: fc [h, 3h]; q [4*64, 2h]; k, v [2*64, 2h]; o [h, 4*64];
# gate, up [I, h]; down [h, I]; lm_head [Vd, h]
MATRICES = [H * 3 * H, 256 * 2 * H, 128 * 2 * H, 128 * 2 * H, H * 256, I * H, I * H, H * I, VD * H]
NORMS = [H] * 4


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("knobs")
    (d / "target.json").write_text(json.dumps(TARGET))
    (d / "draft.json").write_text(json.dumps(DRAFT))
    return str(d / "target.json"), str(d / "draft.json")


def options(configs, output, steps: int = 2, **changes) -> TrainOptions:
    target, draft = configs
    spec = RunSpec(**{"model": target, "draft": draft, "seq": 32, "micro_batch": 1, "ttt": 2, "tp": 1,
                      "attention": "sdpa", **changes})
    return TrainOptions(spec=spec, output=output, steps=steps, random_weights=True, synthetic_data=True,
                        device="cpu", lr=3e-3, save_every=2)


def train_recording_optimizer(opts: TrainOptions, monkeypatch) -> tuple[dict, torch.optim.Optimizer]:
    """Run the trainer; return its report and the optimizer trainer.loop built."""
    built = []
    build = optim.build_optimizer

    def recording(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(optim, "build_optimizer", recording)
    report = run(opts)
    return report, built[0]


def tensor_bytes(t: torch.Tensor) -> int:
    """The bytes a tensor holds: a wrapper subclass (torchao's OptimState8bit) holds its inner tensors'."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.untyped_storage().nbytes()


def moment_bytes(optimizer) -> int:
    inner = getattr(optimizer, "inner", optimizer)
    return sum(tensor_bytes(v) for state in inner.state.values() for k, v in state.items() if k != "step")


# ---------------------------------------------------------------- adamw-8bit


@pytest.mark.parametrize("precision,small_bytes", [("bf16-master", 4), ("bf16", 2)])
def test_8bit_moments_are_torchaos_layout_and_the_estimate(configs, tmp_path, monkeypatch, precision, small_bytes):
    report, optimizer = train_recording_optimizer(options(configs, tmp_path, optimizer="adamw-8bit",
                                                          precision=precision), monkeypatch)
    real = moment_bytes(optimizer)
    # By hand, from torchao's layout: per quantized matrix and moment, n uint8 codes + n/256
    # fp32 scales + a 256-entry fp32 code table; the norms' moments stay in the dtype of what
    # the optimizer updates (fp32 masters in bf16-master, bf16 params in bf16). Two moments.
    quantized = sum(n + n // 256 * 4 + 256 * 4 for n in MATRICES)
    assert real == 2 * quantized + 2 * sum(NORMS) * small_bytes
    # The estimator's term (2 x (1 + 4/256) = 65/32 B per trainable parameter) leaves out the
    # code tables and counts the norms at the quantized rate
    params = sum(MATRICES) + sum(NORMS)
    predicted = report["prediction"]["phase_components"]["optimizer_step"]["optimizer.moments"]
    assert predicted == -(-params * 65 // 32)
    assert real - predicted == 2 * 256 * 4 * len(MATRICES) + 2 * sum(NORMS) * small_bytes - sum(NORMS) * 65 // 32
    assert abs(real - predicted) / predicted < 0.015  # 1.2% here, under 0.01% for a real draft's 1e8+ params


def test_8bit_inner_optimizer_replaces_adamw_in_every_recipe(configs, tmp_path, monkeypatch):
    from torchao.optim import AdamW8bit

    for precision in ("mixed", "fp32-autocast", "bf16-master", "bf16"):
        report, optimizer = train_recording_optimizer(
            options(configs, tmp_path / precision, optimizer="adamw-8bit", precision=precision), monkeypatch)
        inner = getattr(optimizer, "inner", optimizer)
        assert isinstance(inner, AdamW8bit), precision
        assert inner.defaults["betas"] == optim.BETAS and inner.defaults["weight_decay"] == optim.WEIGHT_DECAY
        losses = [s["loss"] for s in report["steps"]]
        assert all(math.isfinite(loss) for loss in losses) and losses[1] != losses[0], (precision, losses)


@pytest.mark.parametrize("knob", [{"optimizer": "adamw-8bit"}, {"offload": "optimizer"}], ids=["8bit", "offload"])
def test_training_with_the_knob_resumes_identically(configs, tmp_path, knob):
    full = run(options(configs, tmp_path / "full", steps=4, **knob))
    (tmp_path / "resumed").mkdir()
    shutil.copytree(tmp_path / "full" / "step-000002", tmp_path / "resumed" / "step-000002")
    opts = options(configs, tmp_path / "resumed", steps=4, **knob)
    opts.resume = True
    assert [s["loss"] for s in run(opts)["steps"]] == [s["loss"] for s in full["steps"][2:]]


def test_the_lr_the_scheduler_sets_is_the_one_the_8bit_step_uses():
    # AdamW's first update moves each weight by lr * g / (|g| + eps) ~ lr: a step at lr 0 moves nothing
    w = torch.nn.Parameter(torch.ones(64, 128))
    opt = optim.adamw_8bit([w], lr=0.1)
    for lr, moved in ((0.0, False), (0.01, True)):
        opt.param_groups[0]["lr"] = lr  # as LambdaLR and checkpoint restore write it: a float
        before = w.detach().clone()
        w.grad = torch.ones_like(w)
        opt.step()
        assert isinstance(opt.param_groups[0]["lr"], float)
        assert (not torch.equal(w, before)) == moved
    assert torch.allclose(before - w.detach(), torch.full_like(w, 0.01), rtol=1e-3)


@pytest.mark.slow
def test_torchaos_compiled_8bit_step_runs_on_cpu_and_matches_the_eager_one():
    # the trainer steps eagerly off the GPU (its CPU meter is a dispatch mode torch.compile cannot
    # trace); torchao's own compiled step must give the same update
    from torchao.optim import AdamW8bit

    torch.manual_seed(0)
    grads = [torch.randn(64, 128) for _ in range(3)]
    weights = []
    for make in (lambda p: optim.adamw_8bit(p, 1e-2),
                 lambda p: AdamW8bit(p, lr=1e-2, betas=optim.BETAS, weight_decay=optim.WEIGHT_DECAY)):
        w = torch.nn.Parameter(torch.zeros(64, 128))
        opt = make([w])
        for g in grads:
            w.grad = g.clone()
            opt.step()
        weights.append(w.detach())
    assert torch.allclose(weights[0], weights[1], atol=1e-6)


class ShardedEightBitJob:
    """Two ranks (gloo), the draft sharded by FSDP2: its 8-bit moments are made from each rank's
    shard. zero2 and zero3 from scratch; then a zero2 run resumed from its step-2 checkpoint."""

    def __init__(self, folder):
        self.folder = folder

    def __call__(self, rank: int) -> dict:
        import torch.distributed as dist
        from test_trainer_multi import options as multi_options
        from test_trainer_multi import train

        out = {}
        for sharding in ("zero2", "zero3"):
            opts = multi_options(self.folder, self.folder / f"out-{sharding}", 2, 1, 1, sharding=sharding,
                                 optimizer="adamw-8bit")
            opts.save_every = 2
            out[sharding] = train(opts)
        if rank == 0:
            shutil.copytree(self.folder / "out-zero2" / "step-000002", self.folder / "resumed" / "step-000002")
        dist.barrier()
        opts = multi_options(self.folder, self.folder / "resumed", 2, 1, 1, sharding="zero2", optimizer="adamw-8bit")
        opts.resume = True
        out["resumed"] = train(opts)
        return out


@pytest.mark.slow
def test_8bit_moments_of_fsdp2_shards_train_like_one_process_and_resume(tmp_path, monkeypatch):
    from test_parallel_spawned import run_spawned
    from test_trainer_multi import assert_matches_one_process, assert_trained, train, write_configs
    from test_trainer_multi import options as multi_options

    monkeypatch.setattr(optim, "clip", optim.clip)  # train() wraps it to record gradients: undone after
    write_configs(tmp_path)
    ranks = run_spawned(ShardedEightBitJob(tmp_path), 2, tmp_path)
    # one process over the same global batch: 2 accumulated micro-steps of B = 1
    reference = train(multi_options(tmp_path, tmp_path / "out-single", 1, 1, 1, accum=2, optimizer="adamw-8bit"))
    for result in ranks:
        for sharding in ("zero2", "zero3"):
            assert_matches_one_process(result[sharding], reference)
        assert result["resumed"]["loss"] == result["zero2"]["loss"][2:]
    assert_trained(reference)


# ---------------------------------------------------------------- bf16-master a parameter at a time

# Shapes of differing sizes (stepped smallest first), each matrix >= 4096 elements and a whole
# number of 256-blocks so torchao quantizes its moments; the vector is below that and is not.
STEPPED_SHAPES = [(64, 128), (256,), (256, 64), (32, 128), (128, 96)]


def _stepped_params() -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator).to(torch.bfloat16)) for shape in STEPPED_SHAPES]


def _give_grads(params: list[torch.nn.Parameter], step: int) -> None:
    generator = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(torch.bfloat16)


def _moment_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor of the inner optimizer's state (an 8-bit moment's codes, scale and table),
    master by master (the state's own order is the order they were first stepped in)."""
    out = []
    for master in optimizer.masters:
        for value in optimizer.inner.state[master].values():
            names = value.__tensor_flatten__()[0] if hasattr(value, "__tensor_flatten__") else None
            out += [getattr(value, n) for n in names] if names else [value]
    return out


@pytest.mark.parametrize("inner", ["adamw", "adamw-8bit"])
def test_a_parameter_at_a_time_updates_exactly_as_all_at_once(inner):
    """The inner optimizer steps only the master that has a grad, so stepping them one at a time
    is the same arithmetic per tensor: bit-equal parameters, masters and moments after three
    steps (torch's fused AdamW and torchao's eager 8-bit step on the CPU), and every master's own
    step count at 3. Masters and moments are made in the first step, as all at once."""
    runs = {}
    for per_param in (True, False):
        params = _stepped_params()
        opt = optim.build_optimizer(params, "bf16-master", 1e-2, inner, per_param=per_param)
        assert opt.per_param == per_param and opt.inner is None and opt.masters == []
        for step in range(3):
            _give_grads(params, step)
            opt.step()
            assert all(p.grad is None for p in params) == per_param  # dropped in the step, or at zero_grad
            assert len(opt.inner.state) == len(params)
            opt.zero_grad(set_to_none=True)
        assert [float(s["step"]) for s in opt.inner.state.values()] == [3.0] * len(params)
        runs[per_param] = params, opt
    (mine, each), (theirs, every) = runs[True], runs[False]
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert all(torch.equal(a, b) for a, b in zip(each.masters, every.masters))
    assert all(torch.equal(a, b) for a, b in zip(_moment_tensors(each), _moment_tensors(every)))
    # smallest first: 256, 4096, 8192, 12288, 16384 elements
    assert [STEPPED_SHAPES[i] for i in each._order] == [(256,), (32, 128), (64, 128), (128, 96), (256, 64)]


@pytest.mark.parametrize("inner", ["adamw", "adamw-8bit"])
def test_a_parameter_at_a_time_restores_from_its_state_dict(inner):
    """A checkpoint's optimizer state (MasterWeightAdamW.state_dict, through torch.save as the
    trainer writes it) restores into a new optimizer, stepping one at a time or all at once
    (the state's layout does not depend on the order), and the next step matches the
    uninterrupted one bit for bit."""
    import io

    params = _stepped_params()
    opt = optim.build_optimizer(params, "bf16-master", 1e-2, inner, per_param=True)
    for step in range(2):
        _give_grads(params, step)
        opt.step()
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    _give_grads(params, 2)
    opt.step()
    for per_param in (True, False):
        restored = [torch.nn.Parameter(torch.zeros_like(p)) for p in params]
        again = optim.build_optimizer(restored, "bf16-master", 1e-2, inner, per_param=per_param)
        saved.seek(0)
        again.load_state_dict(torch.load(saved, weights_only=False))
        _give_grads(restored, 2)
        again.step()
        assert all(torch.equal(a, b) for a, b in zip(restored, params)), per_param
        assert [float(s["step"]) for s in again.inner.state.values()] == [3.0] * len(params)


def test_only_bf16_master_on_the_gpu_steps_a_parameter_at_a_time(configs):
    """layout.steps_per_param: the knob acts where a copy of every grad would be made: whole fp32
    masters (split_master false, or the 8-bit AdamW, which split masters do not take)."""
    from fitplan.layout import resolve, splits_master, steps_per_param

    target, draft = configs

    def job(**changes):
        return resolve(RunSpec(**{"model": target, "draft": draft, "seq": 32, "tp": 1, **changes})).spec

    def stepping(**changes) -> bool:
        return steps_per_param(job(**{"split_master": False, **changes}))

    assert splits_master(job()) and not steps_per_param(job())
    assert not splits_master(job(optimizer="adamw-8bit")) and steps_per_param(job(optimizer="adamw-8bit"))
    assert stepping()
    assert not stepping(optimizer_per_param=False)
    # sft's default is off (hundreds of tensors, one optimizer call each), on when asked
    assert not stepping(workload="sft") and stepping(workload="sft", optimizer_per_param=True)
    assert not any(stepping(precision=p) for p in ("mixed", "fp32-autocast", "bf16"))
    assert not stepping(offload="optimizer")
    # `mixed` keeps fp32 grads on the masters: nothing to copy, whatever it is asked
    mixed = optim.build_optimizer([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], "mixed", 0.1,
                                  per_param=True)
    assert not mixed.per_param


# ---------------------------------------------------------------- offload optimizer


@pytest.mark.parametrize("precision", ["mixed", "fp32-autocast", "bf16-master", "bf16"])
def test_offloaded_optimizer_trains_exactly_like_the_resident_one(configs, tmp_path, monkeypatch, precision):
    # on the GPU bf16-master's masters are whole fp32 tensors here, as on the host (not split)
    whole = {"split_master": False} if precision == "bf16-master" else {}
    resident = run(options(configs, tmp_path / "resident", steps=3, precision=precision, **whole))
    report, optimizer = train_recording_optimizer(
        options(configs, tmp_path / "offload", steps=3, precision=precision, offload="optimizer"), monkeypatch)
    assert isinstance(optimizer, HostAdamW)
    # the same AdamW over the same numbers, on other tensors: the same losses, bit for bit
    assert [s["loss"] for s in report["steps"]] == [s["loss"] for s in resident["steps"]]
    master = precision in optim.MASTER_RECIPES
    for p, host in zip(optimizer.model_params, optimizer.host):
        assert host.device.type == "cpu" and host.data_ptr() != p.data_ptr()
        assert host.dtype == (torch.float32 if master else p.dtype)
    # nothing of the optimizer's state is in the estimate's GPU memory
    components = report["prediction"]["phase_components"]["optimizer_step"]
    assert components.get("optimizer.moments", 0) == components.get("optimizer.master", 0) == 0




def test_offloaded_clip_is_torchs_clip():
    torch.manual_seed(0)
    grads = [torch.randn(8, 8) * 10, torch.randn(8)]
    params = _with_grads([g.clone() for g in grads])
    norm = optim.clip(HostAdamW(params, 0.1, optim.adamw, master=False), 1.0)
    reference = _with_grads([g.clone() for g in grads])
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(reference, 1.0)))
    assert norm == pytest.approx(float(torch.cat([g.flatten() for g in grads]).norm()))  # before clipping
    for p, r in zip(params, reference):
        assert torch.equal(p.grad, r.grad)
    assert float(torch.cat([p.grad.flatten() for p in params]).norm()) == pytest.approx(1.0, rel=1e-5)


def _with_grads(grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g
    return params


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_offloaded_state_is_pinned_host_memory_and_the_8bit_step_compiles():
    layer = torch.nn.Linear(512, 256, bias=False, device="cuda", dtype=torch.bfloat16)
    offloaded = optim.build_optimizer(list(layer.parameters()), "bf16-master", 1e-3, "adamw", "optimizer")
    before = 0
    for _ in range(2):  # the first step also allocates cuBLAS's workspace: measure the second
        layer.zero_grad(set_to_none=True)
        before = torch.cuda.memory_allocated()
        layer(torch.ones(4, 512, device="cuda", dtype=torch.bfloat16)).sum().backward()
        optim.clip(offloaded, 1.0)
        offloaded.step()
    assert torch.cuda.memory_allocated() - before == 512 * 256 * 2  # the bf16 grad, nothing else
    assert all(h.is_pinned() for h in offloaded.host)
    eight = optim.build_optimizer(list(layer.parameters()), "bf16-master", 1e-3, "adamw-8bit")
    eight.step()
    (exp_avg,) = [s["exp_avg"] for s in eight.inner.state.values()]
    assert exp_avg.codes.is_cuda and exp_avg.codes.dtype == torch.uint8


# ---------------------------------------------------------------- measured on a GPU

# fitplan/validation/knob_runs.py on one H200: the AdamW baseline and each knob on the same job
KNOB_REPORTS = sorted((Path(__file__).parent / "data" / "gpu" / "knobs").glob("*.report.json"))


@pytest.mark.parametrize("path", KNOB_REPORTS, ids=[p.name.split(".report")[0] for p in KNOB_REPORTS])
def test_measured_knob_runs_are_predicted_within_2_percent_allocated_and_6_device(path):
    from test_profiles_measured import PHASES, steady

    from fitplan.estimator import estimate_spec
    from fitplan.records import read_measurement

    measurement = read_measurement(path)
    est = estimate_spec(measurement.config)
    measured = steady(measurement)
    errors = {phase: (measured[phase]["allocated"] - sum(est.phases[phase].values())) / sum(est.phases[phase].values())
              for phase in PHASES}
    # never under-predicted by more than 2%; over-predicted by at most 3%: the lean draft's
    # forward on the 1B jobs is over by 1.7-2.8% (the knobs do not touch it). The estimate counts
    # every position in the loss, where a random-weight target's argmax falls in the draft vocab
    # for some only (a quarter, were it uniform over 128256 ids). With the head's gradients made
    # in forward its chunk at S 4096 is all 4095 positions: 4095 x (2 x 32000 + 3 x 2 x 2048) B =
    # 312 MB of logits and [rows, h] tables, 234 MB more than a quarter of them would hold, 3.6%
    # of the 6.0 GiB forward peak, more than the 2.8% measured over
    assert all(-0.03 <= e <= 0.02 for e in errors.values()), {p: f"{e:+.1%}" for p, e in errors.items()}
    device = max(p["device_used"] for p in measured.values())
    assert abs(device - est.peak_reserved_bytes) / est.peak_reserved_bytes <= 0.06
    assert measurement.alloc_retries == 0 and measurement.ooms == 0


# trainer/sft_step.py on one H200, llama-3.2-1b sft S 4096 under bf16-master, masters split (the
# default) and whole, measured after the split masters' terms were written
SFT_MASTER_REPORTS = sorted((Path(__file__).parent / "data" / "gpu" / "split_master").glob("*.report.json"))


@pytest.mark.parametrize("path", SFT_MASTER_REPORTS, ids=[p.name.split(".report")[0] for p in SFT_MASTER_REPORTS])
def test_measured_sft_masters_split_and_whole_are_predicted_within_1_percent(path):
    """Every steady phase within 1% allocated (measured +0.1% to +0.2%), the device level within 2%
    (+0.5%, +0.7%); the optimizer step 17.37 GB split against 24.78 GB whole: 6 B x 1.24e9
    parameters (no 4 B fp32 gradient copy, a 2 B master instead of 4) is 7.4 GB."""
    from fitplan.estimator import estimate_spec
    from fitplan.records import read_measurement

    measurement = read_measurement(path)
    est = estimate_spec(measurement.config)
    steady = measurement.steps[-1]["phases"]
    for phase in ("forward", "backward", "optimizer_step"):
        predicted = sum(est.phases[phase].values())
        assert abs(steady[phase]["allocated"] - predicted) <= 0.01 * predicted, phase
    device = max(p["device_used"] for p in steady.values())
    assert abs(device - est.peak_reserved_bytes) <= 0.02 * est.peak_reserved_bytes
    assert measurement.alloc_retries == 0 and measurement.ooms == 0


def test_split_masters_measured_saving_at_the_sft_step_by_hand():
    from fitplan.records import read_measurement

    split, whole = (read_measurement(p).steps[-1]["phases"]["optimizer_step"]["allocated"] for p in SFT_MASTER_REPORTS)
    params = 1_235_814_400  # llama-3.2-1b, its embedding tied to the head: trained once
    assert abs((whole - split) - 6 * params) <= 0.01 * 6 * params


# ---------------------------------------------------------------- what stays refused


def test_8bit_without_torchao_is_one_line_before_loading(monkeypatch):
    import importlib.util

    from fitplan.errors import FitplanError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(FitplanError, match="optimizer adamw-8bit needs torchao"):
        optim.check_available("adamw-8bit")
    optim.check_available("adamw")  # the fused AdamW is torch's own


def test_the_mxfp4_refusal_names_what_transformers_does():
    # the reason fitplan.layout gives for target_weights mxfp4, read from transformers' source:
    # its MXFP4 experts fetch their Triton kernels from the hub as the model loads
    from transformers.integrations import mxfp4

    from fitplan.layout import TRAINER_KNOBS

    assert 'get_kernel("kernels-community/gpt-oss-triton-kernels"' in inspect.getsource(mxfp4)
    assert "kernels-community/gpt-oss-triton-kernels" in TRAINER_KNOBS[("target_weights", "mxfp4")]


def test_knob_jobs_pass_switches_without_a_value(tmp_path):
    """`MODEL:SEQ:recompute_mlp=true` runs `fitplan train ... --recompute-mlp` (a switch takes no
    value: `--recompute-mlp true` would read `true` as a config file); other flags keep theirs."""
    from fitplan.validation.profile_runs import Job, command

    job = Job.parse("llama-3.1-8b:2048:recompute_mlp=true:optimizer_per_param=False:optimizer=adamw-8bit")
    argv = command(job, tmp_path, tmp_path / "run")
    assert argv[-4:] == ["--recompute-mlp", "--no-optimizer-per-param", "--optimizer", "adamw-8bit"]


def test_the_optimizer_step_benchmark_times_every_mode_on_cpu(tmp_path, capsys):
    """benchmarks/bench_optimizer_step.py on a tiny sft model: one row, the three modes timed."""
    import importlib.util

    model = tmp_path / "tiny.json"
    model.write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                 "head_dim": 16, "vocab_size": 256, "max_position_embeddings": 4096,
                                 "tie_word_embeddings": False}))
    path = Path(__file__).parents[1] / "benchmarks" / "bench_optimizer_step.py"
    spec = importlib.util.spec_from_file_location("bench_optimizer_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--jobs", f"{model}:sft", "--steps", "2", "--device", "cpu"]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {model} sft")]
    # embedding, lm_head, final norm, and per layer 7 projections and 2 norms: 3 + 2 x 9 tensors
    assert len(row) == 1 and row[0].split("|")[2].strip() == "21"
    assert all(float(ms) > 0 for ms in row[0].split("|")[4].split("/"))
