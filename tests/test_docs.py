"""The docs say what the code does: every CLI flag documented, docs/ self-contained, no dead links.

- docs/cli.md documents every command registered in `fitplan.cli.app` in a section of its own
  (a heading naming `fitplan CMD`) holding each of the command's own flags; the job flags every
  job command shares (fitplan/commands/common.py: one per RunSpec field) are documented once,
  in the "Job flags" section. Flags are read from the click objects typer builds, so a flag added
  to the code without a line in docs/cli.md fails here.
- Nothing under docs/ cites notes that live outside the repository (memory-anatomy.md, design.md).
- Every relative Markdown link in docs/*.md and README.md points at a file that exists.
"""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
import typer

from fitplan.cli import app
from fitplan.config import FIELD_NAMES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CLI_MD = DOCS / "cli.md"
JOB_SECTION = "Job flags"
OUTSIDE_NOTES = ("memory-anatomy", "design.md")


def _commands() -> dict[str, click.Command]:
    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return dict(group.commands)


COMMANDS = _commands()


def _long_flags(param: click.Parameter) -> list[str]:
    """`--micro-batch`, and for a boolean switch both `--ac` and `--no-ac`."""
    if not isinstance(param, click.Option):
        return []
    return [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]


def _own_and_job_flags(cmd: click.Command) -> tuple[list[str], list[str]]:
    own, job = [], []
    for param in cmd.params:
        (job if param.name in FIELD_NAMES else own).extend(_long_flags(param))
    return own, job


def _mentions(text: str, flag: str) -> bool:
    """The flag as a whole token: `--output` is not found inside `--output-sharding`."""
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def _sections(text: str) -> dict[str, str]:
    """Heading line -> the text under it, up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    heads = [(i, len(m.group(1)), m.group(2)) for i, line in enumerate(lines)
             if (m := re.match(r"^(#{1,6})\s+(.*)$", line))]
    out = {}
    for n, (i, level, title) in enumerate(heads):
        end = next((j for j, lvl, _ in heads[n + 1:] if lvl <= level), len(lines))
        out[title] = "\n".join(lines[i + 1:end])
    return out


def _section(title_pattern: str) -> str:
    sections = _sections(CLI_MD.read_text())
    found = [body for title, body in sections.items() if re.search(title_pattern, title)]
    assert found, f"docs/cli.md has no section whose heading matches {title_pattern!r}"
    return "\n".join(found)


def test_every_command_is_registered_as_expected():
    # the commands `fitplan --help` lists; a new one needs its section in docs/cli.md
    assert set(COMMANDS) >= {"estimate", "profiles", "fit", "check", "diff", "explain", "validate", "train"}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_md_documents_every_flag_of_every_command(name):
    own, job = _own_and_job_flags(COMMANDS[name])
    section = _section(rf"`fitplan {re.escape(name)}`")
    missing = [f for f in own if not _mentions(section, f)]
    assert not missing, f"docs/cli.md, section `fitplan {name}`: flags not documented: {missing}"
    job_section = _section(re.escape(JOB_SECTION))
    missing_job = [f for f in job if not _mentions(job_section, f)]
    assert not missing_job, f"docs/cli.md, section {JOB_SECTION!r}: job flags of {name} not documented: {missing_job}"
    whole = CLI_MD.read_text()
    assert all(_mentions(whole, f) for f in own + job)


def test_job_flags_are_the_runspec_fields():
    """The shared section is complete for the commands that take job flags at all."""
    job_commands = [n for n, c in COMMANDS.items() if any(p.name in FIELD_NAMES for p in c.params)]
    assert set(job_commands) == {"estimate", "fit", "check", "explain", "train"}
    for name in job_commands:
        names = {p.name for p in COMMANDS[name].params if p.name in FIELD_NAMES}
        assert names == set(FIELD_NAMES), name


def test_checker_finds_a_missing_flag():
    """The whole-token check must fail for a flag that is only a prefix of a documented one."""
    text = "`--output-sharding` and `--no-ac`"
    assert not _mentions(text, "--output")
    assert not _mentions(text, "--ac")
    assert _mentions(text, "--no-ac") and _mentions(text, "--output-sharding")
    assert _mentions("`--ac/--no-ac`", "--ac")


def _doc_files() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_docs_cite_no_notes_outside_the_repository(path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:  # an image
        return
    cited = [name for name in OUTSIDE_NOTES if name in text]
    assert not cited, f"{path.relative_to(ROOT)} cites {cited}, which are not in the repository"


# [text](target) and ![alt](target), and reference definitions `[label]: target`
INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(text: str) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    targets = INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", t, re.IGNORECASE)]


MARKDOWN = sorted(DOCS.glob("*.md")) + [ROOT / "README.md"]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(path):
    broken = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if file_part and not (path.parent / file_part).exists():
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)}: links to missing files: {broken}"


def test_link_finder():
    text = ("[a](docs/x.md) ![img](validation.png) [web](https://example.com) [here](#anchor) "
            "`[not](code.md)`\n```\n[nor](fenced.md)\n```\n[ref]: other.md#part\n")
    assert relative_links(text) == ["docs/x.md", "validation.png", "other.md#part"]
