"""Output that reads whole on an 80-column terminal (or CI log), errors printed verbatim, and a
--plot image that says what it is for.

The CLI runs in-process with COLUMNS=80, as rich sizes its console from it.
"""

from __future__ import annotations

import io
import json
import sys

import pytest
from rich.cells import cell_len
from typer.testing import CliRunner

from fitplan.cli import app
from fitplan.config import load_spec
from fitplan.estimator import estimate_spec
from fitplan.render.estimate import ABBREVIATIONS, GIB, component_names, gib, phase_header

WIDTH = 80
SMALL = "model: llama-3.1-8b\ngpus: 1xH100\nseq: 4096\n"
LONG_PATH = "some/long/path/to/configs/llama-3.1-8b-eagle3-s16k-b4.yaml"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": str(WIDTH)}, terminal_width=WIDTH)


def assert_fits_80(output: str) -> None:
    too_long = [line for line in output.splitlines() if cell_len(line) > WIDTH]
    assert not too_long, "\n".join(too_long)
    assert "…" not in output, output  # rich's mark of a cut cell


JOBS = [
    ("--model", "gpt-oss-120b", "--gpus", "8xH100"),
    ("--model", "llama-3.1-8b", "--gpus", "8xH100", "--workload", "sft"),
    ("--model", "llama-3.1-8b", "--gpus", "8xH100", "--runtime", "specforge"),
    ("--model", "qwen3-8b", "--gpus", "8xH100", "--tp", "8", "--runtime", "specforge", "--seq", "8192"),  # OOM
    ("--model", "llama-3.1-8b", "--gpus", "1xH100", "--seq", "32768", "--attention", "eager"),  # 1000s of GiB
]


def table_columns(output: str) -> tuple[list[str], dict[str, list[str]]]:
    """The breakdown table's header, one string per column (its lines joined by spaces), and
    its body rows by their first cell."""
    lines = output.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    rule = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    header_lines = [[cell.strip() for cell in line.strip("┃").split("┃")] for line in lines[top + 1 : rule]]
    headers = [" ".join(filter(None, column)) for column in zip(*header_lines)]
    rows = {}
    for line in lines[rule + 1 :]:
        if not line.startswith("│"):
            continue
        cells = [cell.strip() for cell in line.strip("│").split("│")]
        rows[cells[0]] = cells[1:]
    return headers, rows


@pytest.mark.parametrize("job", JOBS, ids=lambda job: "-".join(job[1::2]))
def test_estimate_table_reads_whole_at_80_columns(job):
    result = invoke("estimate", *job)
    assert result.exit_code == 0, result.output
    assert_fits_80(result.output)
    data = json.loads(invoke("estimate", *job, "--json").stdout)
    phases = list(data["phases"])
    headers, rows = table_columns(result.output)
    assert headers[0] == "component"
    # each phase's header is its words (some perhaps abbreviated), none split across lines
    for phase, header in zip(phases, headers[1:], strict=True):
        peak = phase == data["peak_phase"]
        candidates = {phase_header(phase, level, peak).replace("\n", " ") for level in range(len(ABBREVIATIONS) + 1)}
        assert header in candidates, (phase, header)
    # and every figure is there, whole
    assert rows["allocated"] == [gib(data["phases"][p]) for p in phases]
    for name, by_phase in rows.items():
        if name in ("allocated", "step 1"):
            continue
        expected = [gib(data["phase_components"][p][name]) if data["phase_components"][p].get(name) else "-"
                    for p in phases]
        assert by_phase == expected, name


def test_estimate_headers_use_the_full_phase_names_when_there_is_room():
    result = CliRunner().invoke(app, ["estimate", "--model", "gpt-oss-120b", "--gpus", "8xH100"],
                                env={"COLUMNS": "160"})
    headers, _ = table_columns(result.output)
    assert [h.removesuffix(" *") for h in headers[1:]] == [
        "load", "target forward", "draft forward", "backward", "optimizer step", "checkpoint"]


def test_profiles_read_whole_at_80_columns():
    result = invoke("profiles")
    assert result.exit_code == 0, result.output
    assert_fits_80(result.output)
    for name in ("qwen3-235b-a22b", "671.03B", "129280", "A100-SXM4-40GB", "1403M + 1051M", "mxfp4"):
        assert name in result.output


def test_check_never_cuts_a_long_config_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / LONG_PATH
    config.parent.mkdir(parents=True)
    config.write_text("model: llama-3.1-8b\nseq: 16384\nmicro_batch: 4\n")
    result = invoke("check", LONG_PATH, "--gpus", "8xH100")
    assert result.exit_code in (0, 1), result.output
    assert_fits_80(result.output)
    assert LONG_PATH in result.output.splitlines()  # whole, on a line of its own
    assert any(v in result.output for v in ("fits", "OOM", "AT RISK", "TIGHT"))
    assert "GiB" in result.output  # the figures are still there


def test_check_table_keeps_the_config_column_whole(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = ["configs/llama-3.1-8b-eagle3-s16k-b4.yaml", "configs/a.yaml"]
    (tmp_path / "configs").mkdir()
    for path in paths:
        (tmp_path / path).write_text(SMALL)
    result = invoke("check", *paths)
    assert result.exit_code == 0, result.output
    assert_fits_80(result.output)
    assert "┃ config" in result.output  # still a table
    for path in paths:
        assert any(line.startswith(f"│ {path} ") for line in result.output.splitlines()), path


def test_check_against_a_revision_reads_whole_at_80_columns(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.chdir(tmp_path)
    for args in (["init", "-q", "-b", "main"], ["config", "user.email", "t@example.com"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], check=True, capture_output=True)
    path = "configs [old]/llama-3.1-8b-eagle3-s16k-b4.yaml"  # brackets: not rich markup either
    (tmp_path / "configs [old]").mkdir()
    (tmp_path / path).write_text(SMALL)
    subprocess.run(["git", "add", "."], check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "x"], check=True, capture_output=True)
    (tmp_path / path).write_text(SMALL.replace("4096", "8192"))
    result = invoke("check", path, "--against", "main")
    assert result.exit_code == 0, result.output
    assert_fits_80(result.output)
    assert any(line.strip("│ ").startswith(path) for line in result.output.splitlines()), result.output
    assert "activations.draft" in result.output and "+" in result.output


def test_check_a_directory_checks_its_yaml_files_sorted(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    for name in ("b.yaml", "a.yml", "c.yaml", ".hidden.yaml", "notes.txt"):
        (configs / name).write_text(SMALL)
    (configs / "nested").mkdir()
    (configs / "nested" / "d.yaml").write_text(SMALL)
    result = invoke("check", f"{configs}/", "--format", "json")
    assert result.exit_code == 0, result.output
    assert [row["path"] for row in json.loads(result.output)["rows"]] == [
        f"{configs}/{name}" for name in ("a.yml", "b.yaml", "c.yaml")]


@pytest.mark.parametrize("command", ["check", "diff"])
def test_a_directory_without_configs_is_one_line_exit_2(tmp_path, command):
    empty = tmp_path / "configs"
    empty.mkdir()
    args = ["check", str(empty)] if command == "check" else ["diff", str(empty), str(empty)]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: ") and str(empty) in result.output and "is a directory" in result.output
    if command == "check":
        assert "*.yaml" in result.output  # what is accepted


def test_a_missing_config_is_one_line_naming_it(tmp_path):
    (tmp_path / "a.yaml").write_text(SMALL)
    missing = tmp_path / "cfg[plot]" / "missing.yaml"
    result = invoke("check", str(tmp_path / "a.yaml"), str(missing))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"error: config file '{missing}' does not exist"


def test_errors_print_square_brackets_verbatim(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    result = invoke("estimate", "--model", "llama-3.2-1b", "--plot", str(tmp_path / "x.png"))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == "error: --plot needs matplotlib: pip install 'fitplan[plot]'"


def test_fail_prints_the_message_as_is(capsys):
    from fitplan.commands.common import fail

    with pytest.raises(SystemExit) as exit_info:
        fail("pip install 'fitplan[plot]' [bold]not bold[/] :smile:")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: pip install 'fitplan[plot]' [bold]not bold[/] :smile:\n"


# ----------------------------------------------------------------------------- --plot

PLOT_JOBS = [
    {"model": "gpt-oss-120b", "gpus": "8xH100"},
    {"model": "qwen3-8b", "gpus": "8xH100", "tp": 8, "runtime": "specforge", "seq": 8192},  # 15 components
    {"model": "llama-3.1-8b", "gpus": "2x8xH100", "workload": "sft", "micro_batch": 2},
]


@pytest.mark.parametrize("flags", PLOT_JOBS, ids=lambda f: f["model"])
@pytest.mark.parametrize("with_spec", [False, True], ids=["estimate-only", "with-spec"])
def test_plot_names_the_job_keeps_its_titles_inside_and_colours_apart(flags, with_spec):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from fitplan.render.plot import DPI, RESERVE_LABEL, figure

    spec = load_spec(None, flags)
    est = estimate_spec(spec)
    fig = figure(est, spec if with_spec else None)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, dpi=DPI)  # as plot_estimate saves it: the image is the figure
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        title = fig._suptitle.get_text()  # get_suptitle() is matplotlib >= 3.8
        for needle in (est.layout["model"], f"{est.world}x {est.layout['gpu']}", f"micro-batch {spec.micro_batch}",
                       f"global batch {est.layout['global_batch']}"):
            assert needle in title, (needle, title)
        if with_spec:
            assert f"seq {spec.seq}" in title
        texts = [fig._suptitle, ax.title, *fig.legends, *ax.get_xticklabels(), ax.xaxis.label, ax.yaxis.label]
        box = fig.bbox
        for text in texts:
            extent = text.get_window_extent(renderer)
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1, text
        colours = {c.get_label(): tuple(c.patches[0].get_facecolor()) for c in ax.containers}
        names = component_names(est)
        assert set(names) <= set(colours)
        assert len({colours[n] for n in names} | {colours[RESERVE_LABEL]}) == len(names) + 1  # all distinct
        # the stack is drawn as estimated
        peak = list(est.phases).index(est.peak_phase)
        stacked = sum(c.patches[peak].get_height() for c in ax.containers if c.get_label() in names)
        assert stacked == pytest.approx(est.peak_allocated_bytes / GIB)
    finally:
        plt.close(fig)


def test_plot_png_is_the_whole_figure(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = tmp_path / "breakdown.png"
    result = invoke("estimate", "--model", "gpt-oss-120b", "--gpus", "8xH100", "--plot", str(out))
    assert result.exit_code == 0, result.output
    height, width = matplotlib.image.imread(out).shape[:2]
    assert width > height > 0


def test_train_says_why_it_wrote_a_snapshot(tmp_path, capsys):
    """A snapshot asked for with --memory-snapshot is not reported as a missed prediction."""
    from fitplan.render.train import show_report

    base = {"steps": [], "comparison": [], "snapshot": str(tmp_path / "memory_snapshot.pickle")}
    for reason, says in (("asked", None), ("missed", "missed its prediction"), ("oom", "out of memory")):
        show_report({**base, "snapshot_reason": reason}, tmp_path)
        out = capsys.readouterr().out
        assert "allocator snapshot at" in out
        assert ("missed its prediction" in out) == (reason == "missed")
        if says:
            assert says in out
