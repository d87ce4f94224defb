"""fitplan's trainer step against SpecForge 0.2.0's offline Eagle3 step: same draft, same B x S, one call.

Run (one H200): python benchmarks/vs_specforge.py --out $OUT --budget 420
Writes $OUT/vs_specforge.json (every config's raw figures) and $OUT/vs_specforge.md (the table it
prints): per shape, fitplan / SpecForge for the time per step and the draft-phase memory, and
each tool's tokens/s and MFU.

What runs. Each (tool, shape) is one fresh subprocess of this script (`--child`), so the two
tools' allocator states and compile caches never mix; the parent collects one JSON line from
each, stops starting configs once --budget seconds have passed, kills a child still running at
--hard-stop, and writes what it has after every config. Configs run shape by shape, SpecForge
then fitplan, so every finished shape has its ratio.

- Inputs, drawn from one seed in both tools: aux hidden states [B, S, 3·h_t] bf16, the target's
  last hidden state [B, S, h_t] bf16, input ids, a loss mask (ones; --assistant-fraction f zeros
  the first 1 - f of each sample). Frozen weights: the target lm_head [V, h_t] and the draft's
  embedding [V, h], random bf16. The lm_head rows of the draft vocab are doubled, so the target's
  top token lies in the draft vocab at almost every position, as with a real target (both tools
  skip or mask the other positions; "valid" in the JSON is the fraction counted).
- SpecForge: LlamaForCausalLMEagle3 built by its AutoDraftModel, OnlineEagle3Model (TTT, its
  flex_attention backend), TargetHead, Eagle3TrainStrategy.forward_loss on an offline TrainBatch
  (target_repr "hidden_state": the head re-scores the stored last hidden state, compact_teacher
  off as in SpecForge's default config; --specforge-teacher compact switches it on), then its
  FSDPTrainingBackend's backward and step with BF16Optimizer (fp32 masters, AdamW, clipping at
  0.5, cosine schedule). The backend runs the module unwrapped (prepare_model(wrap=False)):
  SpecForge's launcher wraps even one GPU in FSDP SHARD_GRAD_OP, fitplan's trainer at world 1
  does not wrap; the comparison is of the step's math. TrainerCore's metric reduction (logging)
  is not run. No module is stubbed: the offline step imports torch, transformers, safetensors,
  huggingface_hub and triton (core/loss.py) only. Should `specforge.modeling.draft`'s package
  init fail (it imports every draft family: DFlash, Domino, ... for their registry), that init
  alone is skipped and the Eagle3 modules are imported directly; the JSON says so ("stubs").
- fitplan: the trainer's own objects, as trainer/loop.py builds them (build_draft,
  optim.build_optimizer for the bf16-master recipe, cosine_with_warmup), and one step as
  train_step runs it, through two adapters: fitplan_teacher (what the trainer's teach does for
  stored features: the target lm_head over the last hidden state, then make_teacher) and fitplan_draft_step
  (draft forward + loss, backward, clip + optimizer + schedule).
- Teacher construction (target lm_head over the last hidden state -> draft-vocab soft labels)
  is counted in both tools' time and memory: SpecForge builds it inside its forward.

Measured per step: the CUDA-event time of the whole step (median of --steps timed steps after
--warmup warm-up steps; every step starts and ends synchronized), each phase's time and peak
allocated bytes (trainer.measure.Meter: a synchronization and reset_peak_memory_stats at each phase
start, a synchronization and the peaks read at its end), the same number of steps again unmetered
(no phase boundary: synchronized at the step's start and end only; the GPU does not wait at each
boundary while the host reads the peaks and starts the next phase), and the first step's wall
time (compilation included). draft_mem = peak allocated over the step minus
frozen_bytes (target lm_head, draft embedding and buffers) minus input_bytes: the draft's weights,
gradients, fp32 masters, Adam moments, activations and teacher. state_bytes = allocated before
a timed step minus the same. On CPU (the smoke test) Meter counts only the tensors the steps
create, and draft_mem is that peak.

FLOPs per step (fitplan.steptime.draft_flops plus the teacher's GEMM), for a draft of hidden h,
intermediate I, H heads, K KV heads of size d, draft vocab Vd, target hidden h_t and vocab V,
TTT length L, B sequences of S tokens:
    P     = 2h·(H + 2K)·d + H·d·h + 3·h·I + 4h + h·Vd       (q/k/v over the 2h-wide concat, o, MLP,
                                                              norms, lm_head: one TTT step's weights)
    fwd   = 2·B·S·(3·h_t·h) + L·(2·B·S·P + 2·B·S²·H·d)      (fc once; per step the weights and the
                                                              causal half of QKᵀ and PV)
    draft = 3·fwd                                            (backward = 2 x forward)
    step  = draft + 2·B·S·V·h_t                              (the teacher's lm_head GEMM)
Step k's extra keys (the diagonal: 4·B·S·k·H·d) are left out, as in steptime: 0.3% at S 2048.
MFU = step FLOPs / step time / the GPU's dense bf16 peak from profiles/gpus.json (H200 SXM:
989 TFLOP/s).

Runtime on one H200 (docs/vs-specforge.md, calls S-X): a config costs ~10 s of process start and
setup, then its first step, which compiles (fitplan: 9-30 s, the split attention's diagonal keys
on Triton kernels compiled once; SpecForge: flex once static and once dynamic, a block mask per
TTT step, its RMSNorm, rotary and teacher functions, 58-90 s, 285 s cold at S 16384), then
~0.1-0.8 s per further step, twice over with the unmetered steps. Two tools over all five shapes take more than one
10-minute device call: --budget ends a call in time, and two or three calls of a few shapes
each cover them (each shape's ratio still comes from one call).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere: the repo's fitplan and trainer
    sys.path.insert(0, str(ROOT))

MARK = "VS_SPECFORGE_RESULT "  # prefix of the child's one JSON line on stdout
# fitplan-plain: the trainer with draft_memory plain (torch's composition of the head, loss and
# SwiGLU), to show what the lean draft costs or saves in the same call; fitplan-recompute-mlp: the
# default trainer with recompute_mlp (gate and up made again in backward); fitplan-head-backward: the
# default with head_grad_in_forward false (the head's logits made again in backward); fitplan-whole-master:
# the default with split_master false (fp32 masters and a gradient copy at the step); specforge-fsdp: SpecForge's
# step with the module wrapped as its trainer wraps it (FSDP1 over a one-rank process group)
TOOLS = ("specforge", "specforge-fsdp", "fitplan", "fitplan-recompute-mlp", "fitplan-plain", "fitplan-head-backward",
         "fitplan-whole-master")
# fitplan's variants: the RunSpec changes each makes to the default trainer job, and its table label
FITPLAN_VARIANTS = {"fitplan": ({}, "fitplan"),
                    "fitplan-recompute-mlp": ({"recompute_mlp": True}, "fitplan (recompute_mlp)"),
                    "fitplan-plain": ({"draft_memory": "plain"}, "fitplan (draft_memory plain)"),
                    "fitplan-head-backward": ({"head_grad_in_forward": False},
                                              "fitplan (head_grad_in_forward false)"),
                    "fitplan-flex": ({"attention": "flex"}, "fitplan (attention flex)"),
                    "fitplan-whole-master": ({"split_master": False}, "fitplan (split_master false)")}
SPECFORGE_TOOLS = ("specforge", "specforge-fsdp")
DEFAULT_SHAPES = "1x2048,1x4096,1x8192,1x16384,2x4096"
WHEEL = ROOT / ".whl" / "specforge-0.2.0-py3-none-any.whl"
OUT_JSON, OUT_MD = "vs_specforge.json", "vs_specforge.md"
GIB = 2**30
RESULT_FIELDS = (
    "tool", "batch", "seq", "ok", "step_s", "step_s_all", "unmetered_step_s", "unmetered_step_s_all", "phases_s", "first_step_s", "setup_s",
    "peak_allocated", "phase_peak_allocated", "frozen_bytes", "input_bytes", "draft_mem", "state_bytes",
    "flops", "tokens_per_s", "mfu", "peak_tflops", "losses", "valid",
)


# ------------------------------------------------------------------ command line


def shape_list(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        b, x, s = item.strip().partition("x")
        if not (x and b.isdigit() and s.isdigit() and int(b) > 0 and int(s) > 1):
            raise argparse.ArgumentTypeError(
                f"{item.strip()!r} is not BATCHxSEQ; accepted: comma-separated BxS with B >= 1, S >= 2, "
                "e.g. 1x2048,2x4096")
        shapes.append((int(b), int(s)))
    return shapes


def tool_list(text: str) -> list[str]:
    tools = [t.strip() for t in text.split(",")]
    bad = [t for t in tools if t not in TOOLS]
    if bad or not tools:
        raise argparse.ArgumentTypeError(f"{', '.join(bad) or text!r}: accepted tools are {', '.join(TOOLS)}")
    return tools


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for vs_specforge.json and vs_specforge.md")
    p.add_argument("--shapes", type=shape_list, default=shape_list(DEFAULT_SHAPES), help=f"BxS list ({DEFAULT_SHAPES})")
    p.add_argument("--tools", type=tool_list, default=["specforge", "fitplan"],
                   help=f"any of {','.join(TOOLS)} (run in the order given)")
    p.add_argument("--profile", action="store_true",
                   help="one more step under torch.profiler: its CUDA kernels, costliest first, and the GPU's "
                        "idle stretches between them, in the JSON")
    p.add_argument("--trace", action="store_true",
                   help="one more step under torch.profiler with the host's calls as well, written as a Chrome "
                        "trace to OUT/TOOL-BxS.trace.json.gz (open in chrome://tracing or Perfetto): what the "
                        "host did while the GPU idled")
    p.add_argument("--budget", type=float, default=420.0, help="seconds after which no new config starts")
    p.add_argument("--hard-stop", type=float, help="seconds after which a running child is killed (budget + 150)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per config (the first compiles)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per config")
    p.add_argument("--model", default="llama-3.1-8b", help="target: fitplan profile name or config path")
    p.add_argument("--draft", default="auto", help="draft: 'auto', a draft profile name or a config path")
    p.add_argument("--gpu", default="H200", help="GPU profile whose dense bf16 peak the MFU is against")
    p.add_argument("--ttt", type=int, default=7)
    p.add_argument("--attention", choices=("auto", "flex", "split", "sdpa", "eager"), default="auto",
                   help="fitplan's kernel (auto: its default for the length, flex below 4096, split from "
                        "4096); SpecForge runs flex_attention, or its sdpa backend for sdpa and eager")
    p.add_argument("--specforge-teacher", choices=("full", "compact"), default="full",
                   help="SpecForge's offline teacher: full-vocab logits (its default) or compact_teacher")
    p.add_argument("--assistant-fraction", type=float, default=1.0, help="loss-mask ones per sample (the tail)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", help="cuda (default when present) or cpu")
    p.add_argument("--wheel", type=Path, default=WHEEL, help="SpecForge wheel installed (--no-deps) when absent")
    p.add_argument("--memory-snapshot", action="store_true",
                   help="record each child's allocator history (torch.cuda.memory, no stack frames) from before "
                        "its setup to its last step into OUT/TOOL-BxS.snapshot.pickle.gz")
    p.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    p.add_argument("--snapshot-to", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--shape", type=shape_list, help=argparse.SUPPRESS)
    p.add_argument("--trace-to", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.ttt < 1 or not 0 < args.assistant_fraction <= 1:
        p.error("accepted: --warmup >= 0, --steps >= 1, --ttt >= 1, 0 < --assistant-fraction <= 1")
    if args.child:
        if not args.shape or len(args.shape) != 1:
            p.error("--child needs one --shape BxS")
        print(MARK + json.dumps(run_child(args)), flush=True)
        return 0
    if args.out is None:
        p.error("--out DIR is required")
    return run_parent(args)


# ------------------------------------------------------------------ parent


def child_argv(args, tool: str, batch: int, seq: int) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", tool, "--shape", f"{batch}x{seq}"]
    for flag in ("warmup", "steps", "model", "draft", "gpu", "ttt", "attention", "specforge_teacher",
                 "assistant_fraction", "seed", "lr", "device"):
        value = getattr(args, flag)
        if value is not None:
            argv += ["--" + flag.replace("_", "-"), str(value)]
    if args.profile:
        argv.append("--profile")
    if args.memory_snapshot:
        argv += ["--snapshot-to", str(args.out.resolve() / f"{tool}-{batch}x{seq}.snapshot.pickle.gz")]
    if args.trace:
        argv += ["--trace-to", str(args.out.resolve() / f"{tool}-{batch}x{seq}.trace.json.gz")]
    return argv


def run_parent(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    hard_stop = args.hard_stop if args.hard_stop is not None else args.budget + 150
    started = time.monotonic()
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv[1:], "budget_s": args.budget,
            "hard_stop_s": hard_stop, "shapes": [f"{b}x{s}" for b, s in args.shapes], "tools": args.tools,
            "specforge_teacher": args.specforge_teacher, "attention": args.attention}
    missing = ensure_specforge(args.wheel) if set(SPECFORGE_TOOLS) & set(args.tools) else None
    results = []
    for batch, seq in args.shapes:
        for tool in args.tools:
            elapsed = time.monotonic() - started
            base = {"tool": tool, "batch": batch, "seq": seq, "ok": False}
            if tool in SPECFORGE_TOOLS and missing:
                results.append({**base, "error": missing})
            elif elapsed > args.budget:
                results.append({**base, "error": f"not started: the {args.budget:.0f} s budget was spent"})
            else:
                results.append(run_config(args, tool, batch, seq, hard_stop - elapsed))
                say(results[-1], time.monotonic() - started)
            meta["elapsed_s"] = round(time.monotonic() - started, 1)
            write_outputs(args.out, meta, results)
    print(render(meta, results))
    return 0


def ensure_specforge(wheel: Path) -> str | None:
    """Install the SpecForge wheel (no dependencies, no index) unless importable; None when ready,
    else why the SpecForge configs cannot run."""
    if importlib.util.find_spec("specforge") is not None:
        return None
    if not wheel.is_file():
        return f"specforge is not installed and {wheel} is absent (pip download --no-deps specforge==0.2.0)"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                          check=False, capture_output=True, text=True)
    if done.returncode != 0:
        return f"pip install {wheel.name} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
    importlib.invalidate_caches()
    return None


def run_config(args, tool: str, batch: int, seq: int, timeout: float) -> dict:
    base = {"tool": tool, "batch": batch, "seq": seq, "ok": False}
    # its own process group: a kill at the hard stop also ends its compile workers
    child = subprocess.Popen(child_argv(args, tool, batch, seq), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, start_new_session=True)
    try:
        out, err = child.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        _, err = child.communicate()
        return {**base, "error": f"killed at the hard stop after {timeout:.0f} s", "stderr_tail": err[-1500:]}
    for line in out.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    return {**base, "error": f"child exited {child.returncode} without a result", "stderr_tail": err[-1500:]}


def say(result: dict, elapsed: float) -> None:
    name = f"{result['tool']} {result['batch']}x{result['seq']}"
    if result.get("ok"):
        line = (f"{result['step_s']:.3f} s/step, draft memory {result['draft_mem'] / GIB:.2f} GiB, "
                f"first step {result['first_step_s']:.0f} s")
    else:
        line = result.get("error", "failed")
    print(f"[{elapsed:5.0f} s] {name}: {line}", file=sys.stderr, flush=True)


def write_outputs(out: Path, meta: dict, results: list[dict]) -> None:
    (out / OUT_JSON).write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    (out / OUT_MD).write_text(render(meta, results) + "\n")


# ------------------------------------------------------------------ the table


def render(meta: dict, results: list[dict]) -> str:
    """Markdown: per fitplan tool and SpecForge variant, one row per shape with fitplan / SpecForge
    ratios, each tool's throughput and MFU."""
    by = {(r["tool"], r["batch"], r["seq"]): r for r in results}
    shapes = list(dict.fromkeys((r["batch"], r["seq"]) for r in results))
    ok = [r for r in results if r.get("ok")]
    peak = ok[0]["peak_tflops"] if ok else None
    device = ok[0].get("device", "?") if ok else "?"
    present = [t for t in TOOLS if any(r["tool"] == t for r in results)]
    lines = []
    for tool in [t for t in present if t not in SPECFORGE_TOOLS]:
        label = FITPLAN_VARIANTS[tool][1]
        for reference in [t for t in present if t in SPECFORGE_TOOLS] or ["specforge"]:
            other = "SpecForge" if reference == "specforge" else "SpecForge FSDP"
            header = (f"| B x S | step s {label} / {other} | time ratio | unmetered step s {label} / {other} "
                      f"| unmetered ratio | draft memory GiB {label} / {other} "
                      f"| memory ratio | tokens/s {label} / {other} | MFU {label} / {other} "
                      f"| first step s {label} / {other} | SM clock MHz {label} / {other} "
                      f"| board power W {label} / {other} | energy J/step {label} / {other} | energy ratio |")
            rows = ["", header, "|---" * 14 + "|"]
            for b, s in shapes:
                f, g = by.get((tool, b, s), {}), by.get((reference, b, s), {})
                rows.append(f"| {b} x {s} | {_pair(f, g, 'step_s', 1, '.3f')} | {_ratio(f, g, 'step_s')} "
                            f"| {_pair(f, g, 'unmetered_step_s', 1, '.3f')} | {_ratio(f, g, 'unmetered_step_s')} "
                            f"| {_pair(f, g, 'draft_mem', GIB, '.2f')} | {_ratio(f, g, 'draft_mem')} "
                            f"| {_pair(f, g, 'tokens_per_s', 1, ',.0f')} | {_pair(f, g, 'mfu', 0.01, '.1f', '%')} "
                            f"| {_pair(f, g, 'first_step_s', 1, '.0f')} | {_pair(f, g, 'sm_mhz', 1, '.0f')} "
                            f"| {_pair(f, g, 'watts', 1, '.0f')} | {_pair(f, g, 'joules_per_step', 1, '.0f')} "
                            f"| {_ratio(f, g, 'joules_per_step')} |")
            lines += rows
    failed = [f"{r['tool']} {r['batch']}x{r['seq']}: {r.get('error', 'failed')}" for r in results if not r.get("ok")]
    teacher = ("full-vocab logits (SpecForge's default)" if meta.get("specforge_teacher", "full") == "full"
               else "compact_teacher")
    caption = (
        f"fitplan's trainer step against SpecForge 0.2.0's offline Eagle3 step on one {device}, same draft "
        f"and inputs, one call; ratios are fitplan / SpecForge. Step: teacher construction (target lm_head over "
        f"the last hidden state; SpecForge's teacher: {teacher}) + draft forward + backward + optimizer, counted in "
        f"both; median of the timed steps, each phase metered (synchronized, its peak read); unmetered: as many "
        f"steps again with no phase boundary, synchronized only at the step's start and end. Draft memory: peak allocated over the step minus the frozen target "
        f"lm_head, draft embedding and buffers and the inputs. MFU: (fitplan.steptime.draft_flops + the teacher's "
        f"2·B·S·V·h) / step time / {peak if peak else '?'} TFLOP/s (dense bf16, profiles/gpus.json). "
        f"Attention: {_attention_shown(meta.get('attention', 'flex'))}. First step: wall time including compilation. "
        f"SM clock and board power: medians over the timed steps of NVML's readings as each phase finished queuing "
        f"(dashes where NVML did not answer); energy: that power times the step. SpecForge: "
        f"its module unwrapped; SpecForge FSDP: wrapped in FSDP1 over one rank, as its trainer wraps it.")
    lines = [caption, *lines]
    if failed:
        lines += ["", "Not measured: " + "; ".join(failed)]
    return "\n".join(lines)


def _pair(f: dict, g: dict, key: str, unit: float, fmt: str, suffix: str = "") -> str:
    """Both tools' `key`; a dash for a failed run or a result from before the key was measured."""
    return " / ".join(format(r[key] / unit, fmt) + suffix if r.get("ok") and key in r else "—" for r in (f, g))


def _ratio(f: dict, g: dict, key: str) -> str:
    if not (f.get("ok") and g.get("ok") and key in f and key in g) or not g[key]:
        return "—"
    return f"{f[key] / g[key]:.2f}x"


# ------------------------------------------------------------------ child: shared


def run_child(args) -> dict:
    import torch

    tool, (batch, seq) = args.child, args.shape[0]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    result = {"tool": tool, "batch": batch, "seq": seq, "ok": False, "device": _device_name(device),
              "attention": args.attention, "ttt": args.ttt, "warmup": args.warmup, "steps": args.steps,
              "versions": _versions(tool)}
    recording = args.snapshot_to is not None and device.type == "cuda"
    if recording:
        torch.cuda.memory._record_memory_history(max_entries=1_000_000, context=None, stacks="python")
    try:
        job = bench_job(args, batch, seq)
        start = time.perf_counter()
        torch.manual_seed(args.seed)
        frozen, inputs = make_tensors(job, device, args.seed, args.assistant_fraction)
        result["valid"] = counted_fraction(frozen, inputs)
        step, frozen_bytes, notes = BUILDERS[tool](job, frozen, inputs, device, args)
        # Emptied, not only unbound: a reference to the dict outlived the builder in SpecForge's
        # runs (the draws' embedding, copied into its draft, stayed allocated to the end).
        frozen.clear()
        del frozen
        result.update(notes)
        result["frozen_bytes"] = frozen_bytes
        result["input_bytes"] = sum(t.numel() * t.element_size() for t in inputs.values())
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["setup_s"] = time.perf_counter() - start
        result.update(measure(step, device, args.warmup, args.steps))
        if args.profile and device.type == "cuda":
            result["kernels"], result["gpu_idle"] = profile_step(step)
        if args.trace_to is not None and device.type == "cuda":
            result["trace"] = trace_step(step, args.trace_to)
        # CPU (the smoke test): Meter's tracker counts only tensors the steps create
        held = result["frozen_bytes"] + result["input_bytes"] if device.type == "cuda" else 0
        result["draft_mem"] = result["peak_allocated"] - held
        result["state_bytes"] = result["held_before_step"] - held
        result.update(throughput(job, result["step_s"], batch, seq))
        result["ok"] = True
    except torch.OutOfMemoryError as exc:  # any other error: the parent records the traceback's tail
        result["error"] = "out of memory: " + str(exc).splitlines()[0]
    if recording:
        result["snapshot"] = dump_snapshot(args.snapshot_to)
    return result


def dump_snapshot(path: Path) -> str:
    """The allocator history recorded so far, gzipped (what fitplan/allocator/trace.py reads)."""
    import gzip
    import pickle

    import torch

    with gzip.open(path, "wb") as f:
        pickle.dump(torch.cuda.memory._snapshot(), f)
    torch.cuda.memory._record_memory_history(enabled=None)
    return path.name


def profile_step(step) -> tuple[list[dict], dict]:
    """One more step under torch.profiler: its CUDA kernels, costliest first (name, ms, calls), and
    where the GPU idled between them (`idle_summary`)."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(lambda name: contextlib.nullcontext())
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    kernels = [{"name": e.key[:120], "ms": round(e.device_time_total / 1000, 2), "calls": e.count} for e in rows]
    spans = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == DeviceType.CUDA]
    return kernels, idle_summary(spans)


def trace_step(step, path: Path) -> str:
    """One more step under torch.profiler, host calls (with their input shapes) and CUDA kernels, as a
    gzipped Chrome trace. Its own step: recording the host's calls slows the host, so its idle stretches are not the
    ones `profile_step` reports."""
    import gzip
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step(lambda name: contextlib.nullcontext())
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(plain))
        with plain.open("rb") as src, gzip.open(path, "wb") as dst:
            dst.write(src.read())
    return path.name


def idle_summary(spans: list[tuple[float, float, str]], most: int = 12) -> dict:
    """From kernels' (start, end, name) in microseconds: the time from the first start to the last
    end, the time some kernel ran (overlaps counted once), the rest as idle, and the `most`
    longest idle stretches with the kernels either side: where the GPU waited for the host."""
    if not spans:
        return {"span_ms": 0.0, "busy_ms": 0.0, "idle_ms": 0.0, "gaps": []}
    spans = sorted(spans)
    busy, gaps = 0.0, []
    run_start, run_end, last = spans[0][0], spans[0][1], spans[0][2]
    for start, end, name in spans[1:]:
        if start > run_end:
            busy += run_end - run_start
            gaps.append((start - run_end, last, name))
            run_start = start
        if end >= run_end:
            run_end, last = end, name
    busy += run_end - run_start
    span = run_end - spans[0][0]  # run_end: the latest end of all
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3), "idle_ms": round((span - busy) / 1e3, 3),
            "gaps": [{"ms": round(g / 1e3, 3), "after": a[:80], "before": b[:80]} for g, a, b in gaps[:most]]}


def _attention_shown(given: str) -> str:
    if given == "auto":
        return "fitplan's default for the length (flex below 4096, split from 4096), SpecForge flex_attention"
    return given


def bench_job(args, batch: int, seq: int):
    """The resolved fitplan job: the draft's shape, the recipe, the GPU's peak, the FLOPs."""
    from fitplan.config import RunSpec
    from fitplan.layout import resolve

    changes = FITPLAN_VARIANTS.get(getattr(args, "child", None), ({}, ""))[0]
    attention = None if args.attention == "auto" else args.attention
    return resolve(RunSpec(model=args.model, draft=args.draft, gpus=f"1x{args.gpu}", seq=seq, micro_batch=batch,
                           ttt=args.ttt, tp=1, precision="bf16-master", **{"attention": attention, **changes}))


def make_tensors(job, device, seed: int, assistant_fraction: float) -> tuple[dict, dict]:
    """Frozen weights and inputs, the same draws in both tools (one generator on the device)."""
    import torch

    from trainer import vocab

    m, d, (b, s) = job.model, job.draft, (job.spec.micro_batch, job.spec.seq)
    gen = torch.Generator(device).manual_seed(seed)
    bf16 = {"device": device, "dtype": torch.bfloat16, "generator": gen}
    draft_ids = torch.randperm(d.vocab, generator=torch.Generator().manual_seed(seed))[: d.draft_vocab].sort().values
    lm_head = torch.randn(m.vocab, d.target_hidden, **bf16).mul_(d.target_hidden**-0.5)
    rows = draft_ids.to(device)
    lm_head[rows] *= 2  # the target's top token lands in the draft vocab, as it mostly does for a real target
    d2t, t2d = vocab.mapping(draft_ids, d.vocab)
    frozen = {"lm_head": lm_head, "embedding": torch.randn(d.vocab, d.hidden, **bf16).mul_(0.02),
              "draft_ids": rows, "d2t": d2t.to(device), "t2d": t2d.to(device)}
    mask = torch.zeros(b, s, dtype=torch.long, device=device)
    mask[:, s - max(1, round(s * assistant_fraction)):] = 1
    inputs = {"aux": torch.randn(b, s, 3 * d.target_hidden, **bf16),
              "hidden": torch.randn(b, s, d.target_hidden, **bf16),
              "ids": torch.randint(0, d.vocab, (b, s), device=device, generator=gen), "mask": mask}
    return frozen, inputs


def counted_fraction(frozen: dict, inputs: dict) -> float:
    """Positions whose target top token is in the draft vocab and that the loss mask keeps."""
    import torch

    hidden, t2d, counted = inputs["hidden"], frozen["t2d"], 0
    with torch.no_grad():
        for start in range(0, hidden.shape[1], 1024):
            top = (hidden[:, start:start + 1024] @ frozen["lm_head"].T).argmax(-1)
            counted += int((t2d[top] & inputs["mask"][:, start:start + 1024].bool()).sum())
    return counted / inputs["mask"].numel()


def module_frozen_bytes(module) -> int:
    """Buffers and frozen parameters: what the module holds that training does not update."""
    held = [*module.buffers(), *(p for p in module.parameters() if not p.requires_grad)]
    return sum(t.numel() * t.element_size() for t in held)


def throughput(job, step_s: float, batch: int, seq: int) -> dict:
    from fitplan.steptime import draft_flops

    teacher = 2 * batch * seq * job.model.vocab * job.draft.target_hidden  # the frozen lm_head's GEMM
    flops = draft_flops(job) + teacher
    peak = job.cluster.gpu.bf16_tflops
    return {"flops": flops, "tokens_per_s": batch * seq / step_s, "peak_tflops": peak,
            "mfu": flops / step_s / (peak * 1e12)}


def gpu_reading(device) -> dict:
    """The SM clock (MHz) and board power (W) through NVML, or nothing where it does not answer
    (a CPU run, or no NVML): at the power limit the clock is throttled, and a step's time with it."""
    import torch

    if device.type != "cuda":
        return {}
    try:
        return {"sm_mhz": torch.cuda.clock_rate(device), "watts": torch.cuda.power_draw(device) / 1e3}
    except Exception:  # NVML absent or unsupported: the timings still stand
        return {}


class Clock:
    """One step's phases: CUDA-event (CPU: wall) time, trainer.measure.Meter's memory peaks, and
    the SM clock and board power read as each phase's kernels finish queuing."""

    def __init__(self, device, meter):
        self.device, self.meter, self.marks, self.readings = device, meter, [], []

    def mark(self):
        import torch

        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        return start.elapsed_time(end) / 1e3 if self.device.type == "cuda" else end - start

    @contextlib.contextmanager
    def phase(self, name: str):
        with self.meter.phase(name):  # synchronizes and resets the peak at the start, reads it at the end
            start = self.mark()
            yield
            self.marks.append((name, start, self.mark()))
            self.readings.append(gpu_reading(self.device))  # before the meter's sync: the GPU still busy

    def step(self, step_fn) -> dict:
        import torch

        self.marks, self.readings = [], []
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        wall, first = time.perf_counter(), self.mark()
        loss = step_fn(self.phase)
        last = self.mark()
        sync()
        memory = self.meter.new_step()
        return {"seconds": self.seconds(first, last), "wall_s": time.perf_counter() - wall, "loss": loss,
                "phases": {name: self.seconds(s, e) for name, s, e in self.marks},
                "allocated": {name: m["allocated"] for name, m in memory.items()},
                "reserved": max(m["reserved"] for m in memory.values()), "gpu": self.readings}

    def unmetered_step(self, step_fn) -> float:
        """Seconds of one step with no phase boundary: synchronized at its start and end only, so
        the host prepares each phase while the GPU still runs the last, as in a training run
        without a meter. The metered steps' synchronizations and peak reads at every phase
        boundary leave the GPU idle while the host starts the next phase."""
        import torch

        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        sync()
        first = self.mark()
        step_fn(lambda name: contextlib.nullcontext())
        last = self.mark()
        sync()
        return self.seconds(first, last)


def measure(step_fn, device, warmup: int, steps: int) -> dict:
    import torch

    from trainer.measure import Meter

    records, held = [], 0
    with Meter(device) as meter:
        clock = Clock(device, meter)
        for i in range(warmup + steps):
            if i == warmup:
                held = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            records.append(clock.step(step_fn))
        unmetered = [clock.unmetered_step(step_fn) for _ in range(steps)]
    timed = records[warmup:]
    phases = {name: statistics.median(r["phases"][name] for r in timed) for name in timed[0]["phases"]}
    peaks = {name: max(r["allocated"][name] for r in timed) for name in timed[0]["allocated"]}
    readings = [reading for r in timed for reading in r["gpu"] if reading]
    gpu = {key: statistics.median(reading[key] for reading in readings) for key in ("sm_mhz", "watts") if readings}
    step_s = statistics.median(r["seconds"] for r in timed)
    if "watts" in gpu:  # at the power limit the step is as long as its energy: the median power times the step
        gpu["joules_per_step"] = gpu["watts"] * step_s
    return {**gpu, "step_s": step_s, "step_s_all": [r["seconds"] for r in records],
            "unmetered_step_s": statistics.median(unmetered), "unmetered_step_s_all": unmetered,
            "first_step_s": records[0]["wall_s"], "phases_s": phases, "phase_peak_allocated": peaks,
            "peak_allocated": max(peaks.values()), "peak_reserved": max(r["reserved"] for r in timed),
            "held_before_step": held, "losses": [r["loss"] for r in records]}


def _device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _versions(tool: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    names = ("torch", "transformers", "triton") + (("specforge",) if tool in SPECFORGE_TOOLS else ())
    found = {}
    for name in names:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


# ------------------------------------------------------------------ child: fitplan


def fitplan_teacher(hidden, lm_head, ids, mask, draft_ids, t2d, ttt: int, as_logits: bool = True):
    """trainer/features.teach on given tensors: the target's logits from its last hidden state
    through its lm_head, then make_teacher; (input ids padded by ttt, teacher)."""
    import torch.nn.functional as F

    from trainer.loss import make_teacher

    logits = F.linear(hidden, lm_head)
    teacher = make_teacher(logits, mask, draft_ids, t2d, ttt, as_logits)
    return F.pad(ids, (0, ttt)), teacher


def fitplan_draft_step(draft, optimizer, aux, ids, teacher, ttt: int, *, scheduler=None,
                       precision: str = "bf16-master", max_grad_norm: float = 0.5, phase=None) -> float:
    """The draft part of trainer/loop.py train_step (one micro-step): forward + loss, backward,
    clip + optimizer + schedule. `ids` is [B, S + ttt] (fitplan_teacher's). The teacher is
    emptied where train_step lets it go (before backward when the head made its gradients in
    forward, else after), so the caller's reference holds nothing
    through the optimizer phase. Returns the loss."""
    from trainer import optim

    phase = phase or (lambda name: contextlib.nullcontext())
    with phase("forward"), optim.autocast(precision, aux.device):
        loss, _ = draft(aux, ids, ttt, teacher)
    if draft.head_grad_in_forward:
        vars(teacher).clear()  # as train_step lets it go: backward does not read it
    with phase("backward"):
        loss.backward()
    value = loss.detach()  # read after the optimizer is launched, as train_step reads it
    del loss
    vars(teacher).clear()
    with phase("optimizer"):
        optim.clip(optimizer, max_grad_norm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        draft.zero_grad(set_to_none=True)
    return float(value)


class _EmbeddingSource:
    """What trainer/loop.py build_draft copies the draft's frozen embedding from."""

    def __init__(self, weight):
        from torch import nn

        self.embedding = nn.Embedding.from_pretrained(weight, freeze=True)

    def get_input_embeddings(self):
        return self.embedding


def build_fitplan(job, frozen: dict, inputs: dict, device, args):
    from fitplan.layout import splits_master
    from trainer import loop, optim
    from trainer.target import hf_config

    spec, total = job.spec, args.warmup + args.steps
    draft = loop.build_draft(job, hf_config(spec.model), _EmbeddingSource(frozen["embedding"]),
                             frozen["draft_ids"].cpu(), device)
    optimizer = optim.job_optimizer(draft.trainable(), spec, args.lr)
    scheduler = optim.cosine_with_warmup(optimizer, 0, total)
    lm_head, draft_ids, mask = frozen["lm_head"], frozen["draft_ids"], inputs["mask"].bool()

    def step(phase) -> float:
        with phase("teacher"):
            ids, teacher = fitplan_teacher(inputs["hidden"], lm_head, inputs["ids"], mask, draft_ids, draft.t2d,
                                           spec.ttt, as_logits=draft.fused_norms)
        return fitplan_draft_step(draft, optimizer, inputs["aux"], ids, teacher, spec.ttt, scheduler=scheduler,
                                  precision=spec.precision, phase=phase)

    frozen_bytes = lm_head.numel() * lm_head.element_size() + module_frozen_bytes(draft)
    return step, frozen_bytes, {"recipe": spec.precision, "recompute_mlp": draft.midlayer.recompute_mlp,
                                "split_master": splits_master(spec)}


# ------------------------------------------------------------------ child: SpecForge


def import_specforge() -> dict:
    """The SpecForge objects of the offline Eagle3 step, and which package init was skipped."""
    stubs = []
    try:
        import specforge.modeling.draft  # noqa: F401
    except ImportError as exc:
        stubs.append(f"specforge.modeling.draft.__init__ skipped ({type(exc).__name__}: {exc})")
        _bare_draft_package()
    from specforge.algorithms.eagle3.model import OnlineEagle3Model
    from specforge.modeling.auto import AutoDraftModel
    from specforge.modeling.target.target_head import TargetHead
    from specforge.optimizer import BF16Optimizer
    from specforge.runtime.contracts import TrainBatch
    from specforge.training.backend import FSDPTrainingBackend, ParallelConfig
    from specforge.training.strategies.base import Eagle3TrainStrategy

    return {"OnlineEagle3Model": OnlineEagle3Model, "AutoDraftModel": AutoDraftModel, "TargetHead": TargetHead,
            "BF16Optimizer": BF16Optimizer, "TrainBatch": TrainBatch, "FSDPTrainingBackend": FSDPTrainingBackend,
            "ParallelConfig": ParallelConfig, "Eagle3TrainStrategy": Eagle3TrainStrategy, "stubs": stubs}


def _bare_draft_package() -> None:
    """specforge.modeling.draft without its __init__ (which imports every draft family): the
    Eagle3 step needs only its base class and llama3_eagle, imported from the package's folder."""
    import types

    spec = importlib.util.find_spec("specforge.modeling")
    package = types.ModuleType("specforge.modeling.draft")
    package.__path__ = [str(Path(spec.submodule_search_locations[0]) / "draft")]
    sys.modules["specforge.modeling.draft"] = package
    from specforge.modeling.draft.base import Eagle3DraftModel
    from specforge.modeling.draft.llama3_eagle import LlamaForCausalLMEagle3

    package.Eagle3DraftModel, package.LlamaForCausalLMEagle3 = Eagle3DraftModel, LlamaForCausalLMEagle3


def one_rank_parallel_config():
    """SpecForge's ParallelConfig for a one-rank job, made as its launcher makes it
    (specforge.distributed.init_distributed: NCCL process group, dp x tp and draft meshes)."""
    from specforge.distributed import init_distributed
    from specforge.training.backend import ParallelConfig

    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", "29517")):
        os.environ.setdefault(name, value)
    init_distributed(tp_size=1)
    return ParallelConfig.from_distributed(tp_size=1)


def specforge_configs(job, fitplan_cfg) -> tuple:
    """(target config, draft config) as LlamaConfigs, from the same shapes fitplan trains."""
    from transformers import LlamaConfig

    m, d = job.model, job.draft
    rope = {"rope_type": "default", "rope_theta": fitplan_cfg.rope_theta}
    # TargetHead reads hidden_size and vocab_size; the rest keeps the config valid
    target = LlamaConfig(hidden_size=d.target_hidden, vocab_size=m.vocab, num_attention_heads=d.heads,
                         num_key_value_heads=d.kv_heads, head_dim=d.head_dim, num_hidden_layers=1,
                         tie_word_embeddings=False)
    draft = LlamaConfig(architectures=["LlamaForCausalLMEagle3"], hidden_size=d.hidden,
                        intermediate_size=d.intermediate, num_attention_heads=d.heads, num_key_value_heads=d.kv_heads,
                        head_dim=d.head_dim, vocab_size=d.vocab, num_hidden_layers=1, hidden_act="silu",
                        max_position_embeddings=job.spec.seq + 64, rms_norm_eps=fitplan_cfg.rms_eps,
                        rope_parameters=rope, tie_word_embeddings=False, pad_token_id=0)
    draft.draft_vocab_size, draft.target_hidden_size = d.draft_vocab, d.target_hidden
    return target, draft


def build_specforge(job, frozen: dict, inputs: dict, device, args):
    import torch
    from torch import nn

    from trainer import loop
    from trainer.target import hf_config

    sf = import_specforge()
    spec = job.spec
    target_cfg, draft_cfg = specforge_configs(job, loop.draft_config(job, hf_config(spec.model)))
    backend_name = "sdpa" if args.attention in ("sdpa", "eager") else "flex_attention"
    with tempfile.TemporaryDirectory() as folder, torch.device(device), loop.default_dtype(torch.bfloat16):
        target_cfg.save_pretrained(folder)  # TargetHead reads its config from a model folder
        head = sf["TargetHead"](folder)
        head.fc.weight = nn.Parameter(frozen["lm_head"], requires_grad=False)
        head.freeze_weights()
        head = head.eval()
        draft = sf["AutoDraftModel"].from_config(draft_cfg, attention_backend=backend_name, torch_dtype=torch.bfloat16)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(frozen["embedding"])
        draft.t2d.copy_(frozen["t2d"])
        draft.d2t.copy_(frozen["d2t"])
    draft.freeze_embedding()
    model = sf["OnlineEagle3Model"](draft_model=draft, length=spec.ttt, attention_backend=backend_name)
    model = model.to(device=device, dtype=torch.bfloat16)

    def optimizer(module):
        return sf["BF16Optimizer"](module, lr=args.lr, max_grad_norm=0.5, total_steps=args.warmup + args.steps + 1000)

    frozen_bytes = module_frozen_bytes(head) + module_frozen_bytes(model)
    wrap = args.child == "specforge-fsdp"
    backend = sf["FSDPTrainingBackend"](one_rank_parallel_config() if wrap else sf["ParallelConfig"](),
                                        optimizer_factory=optimizer)
    module = backend.prepare_model(model, wrap=wrap, optimizer_target=model.draft_model)
    strategy = sf["Eagle3TrainStrategy"](module, target_head=head, compact_teacher=args.specforge_teacher == "compact")
    tensors = {"input_ids": inputs["ids"], "attention_mask": torch.ones_like(inputs["mask"]),
               "loss_mask": inputs["mask"], "hidden_state": inputs["aux"], "target": inputs["hidden"]}
    batch = sf["TrainBatch"](sample_ids=[str(i) for i in range(spec.micro_batch)], strategy="eagle3",
                             tensors=tensors, metadata={"target_repr": "hidden_state"})
    inputs["attention_mask"] = tensors["attention_mask"]  # an input SpecForge needs: counted with the others

    def step(phase) -> float:
        with phase("forward"):
            out = strategy.forward_loss(batch)
        with phase("backward"):
            backend.backward(out.loss)
        with phase("optimizer"):
            backend.step()
        return float(out.loss.detach())

    notes = {"stubs": sf["stubs"], "specforge_teacher": args.specforge_teacher, "specforge_backend": backend_name,
             "wrapped": wrap}
    return step, frozen_bytes, notes


BUILDERS = {**{tool: build_fitplan for tool in FITPLAN_VARIANTS}, "specforge": build_specforge,
            "specforge-fsdp": build_specforge}


if __name__ == "__main__":
    sys.exit(main())
