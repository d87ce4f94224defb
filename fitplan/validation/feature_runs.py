"""Train from stored features on a GPU: `fitplan train --hidden-states` end to end, measured.

A scaled-down Llama-3.1-8B (its widths and vocabulary, 8 decoder layers) with random weights
writes SpecForge-format features for a few synthetic samples (trainer/feature_writer.py, in a
process of its own), then `fitplan train --hidden-states` trains the draft from them for a few
steps in a fresh process (a clean CUDA context, so the report's device figures are the
trainer's alone). OUT gets the trainer's report and a summary: each phase's prediction against
the measurement, the losses, the seconds spent.

    PYTHONUNBUFFERED=1 python -m fitplan.validation.feature_runs --out $OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fitplan.units import GIB

# Llama-3.1-8B's config.json, 8 of its 32 layers: every width the draft and the lm_head see is real.
TARGET = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 8, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False,
}
AUX_LAYERS = (1, 3, 4)  # 1, n/2-1, n-4 of 8 layers
JOB_TIMEOUT_S = 300


def write(config: Path, features: Path, aux_layers: tuple[int, ...], samples: int, seq: int, device: str) -> None:
    """The features of `samples` synthetic sequences of `seq` tokens, written by the random target."""
    from trainer.data import synthetic_sample
    from trainer.feature_writer import write_random_target_features

    vocab = json.loads(config.read_text())["vocab_size"]
    rows = [synthetic_sample(i, seq, vocab, 0) for i in range(samples)]
    write_random_target_features(features, str(config), aux_layers, rows, device=device)


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT_S, check=False)
    log.write_text(proc.stdout[-20000:] + "\n--- stderr ---\n" + proc.stderr[-20000:])
    return proc.returncode, round(time.time() - start, 1)


def summary(report: dict) -> dict:
    rows = [r for r in report["comparison"] if r["when"] == "steady" or r["phase"] == "load"]
    return {
        "losses": [s["loss"] for s in report["steps"]],
        "acc0": [s["acc"][0] for s in report["steps"]],
        "step_seconds": [s["seconds"] for s in report["steps"]],
        "comparison": rows,
        "predicted_components": report["prediction"]["components"],
    }


def table(rows: list[dict]) -> str:
    lines = ["| phase | when | predicted GiB | measured GiB | error |", "|---|---|---|---|---|"]
    for r in rows:
        pred = "-" if r["predicted"] is None else f"{r['predicted'] / GIB:.2f}"
        err = "-" if r["error_pct"] is None else f"{r['error_pct']:+.1f}%"
        lines.append(f"| {r['phase']} | {r['when']} | {pred} | {r['measured'] / GIB:.2f} | {err} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=6)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke check of the script (with a small target)")
    parser.add_argument("--write-only", type=Path, help=argparse.SUPPRESS)  # the writer's own process
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--aux", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.write_only is not None:
        aux = tuple(int(x) for x in args.aux.split(","))
        write(args.config, args.write_only, aux, args.samples, args.seq, args.device)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fitplan-features-"))
    try:
        return _run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args, work: Path, target: dict = TARGET, aux_layers: tuple[int, ...] = AUX_LAYERS) -> int:
    config, features, folder = work / "config.json", work / "features", work / "run"
    config.write_text(json.dumps(target))
    aux = ",".join(map(str, aux_layers))
    me = [sys.executable, "-m", "fitplan.validation.feature_runs", "--out", str(args.out), "--device", args.device]
    code, write_s = run(me + ["--write-only", str(features), "--config", str(config), "--aux", aux,
                              "--samples", str(args.samples), "--seq", str(args.seq)], args.out / "write.log")
    result = {"target": target, "aux_layers": aux_layers, "samples": args.samples, "seq": args.seq,
              "write_exit": code, "write_s": write_s,
              "feature_bytes": sum(p.stat().st_size for p in features.rglob("*.ckpt"))}
    if code == 0:
        train = [sys.executable, "-m", "fitplan.cli", "train", "--model", str(config), "--gpus", "1xH200",
                 "--aux-layers", aux, "--seq", str(args.seq), "--random-weights", "--device", args.device,
                 "--hidden-states", str(features), "--steps", str(args.steps), "--output", str(folder), "--json"]
        if args.device == "cpu":
            train += ["--attention", "sdpa"]  # flex attention has no backward on CPU
        result["train_exit"], result["train_s"] = run(train, args.out / "train.log")
        if (folder / "report.json").is_file():
            report = json.loads((folder / "report.json").read_text())
            shutil.copy(folder / "report.json", args.out / "report.json")
            result.update(summary(report))
            print(table(result["comparison"]))
    (args.out / "summary.json").write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result.get(k) for k in ("write_exit", "write_s", "train_exit", "train_s", "losses")}))
    return 0 if result.get("train_exit") == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
