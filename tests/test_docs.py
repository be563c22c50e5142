"""The README and docs/ stay true to the code: every relative link and ``#anchor`` resolves, and every
``cifar-resnet`` / ``cifar-resnet-export`` command they show parses with the program's own parser (built
as the command builds it, captured before anything runs: nothing trains). ``make docs-check`` runs this file."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from jsonargparse import ArgumentParser, capture_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
SHELL_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>", "2>&1", ")"}
PROGRAMS = {"cifar-resnet": "cifar-resnet", "cifar_resnet": "cifar-resnet", "cifar-resnet-export": "cifar-resnet-export",
            "cifar_resnet.export": "cifar-resnet-export"}  # fmt: skip
# Commands that show a run's own config.yaml (runs/<name>/version_N/config.yaml) are parsed with the recipe it
# was written from, configs/<name>.yaml: the run folder exists only after a fit.
# What may stand before a command on its line: nothing, a shell operator, a launcher, or a "with:" in a message.
LAUNCHERS = {"srun", "exec", "env", "time", "nohup", "sudo", "mpirun", "then", "do"}
RUN_CONFIG = re.compile(r"(?:^|/)runs/([^/]+)/[^/]+/config\.yaml$")


@dataclass(frozen=True)
class Command:
    """A command shown in a document: the program, its arguments and where it stands."""

    program: str
    args: tuple[str, ...]
    where: str


def without_code(text: str) -> str:
    """``text`` with fenced blocks and inline code blanked out (their brackets are not links)."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    return INLINE_CODE.sub("", text)


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text (links and code reduced to their text), lower case,
    punctuation dropped, spaces turned into hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    """Every heading anchor of a Markdown text, with GitHub's ``-1``, ``-2`` for repeated headings."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", markdown)):
        base = slug(match.group(1))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def dead_links(path: Path) -> list[str]:
    """The relative links of the Markdown file ``path`` whose file or ``#anchor`` does not exist."""
    dead = []
    for match in LINK.finditer(without_code(path.read_text(encoding="utf-8"))):
        target = match.group(1)
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}: ({target})"
        if not linked.exists():
            dead.append(f"{where}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text(encoding="utf-8")):
            dead.append(f"{where}: no heading with anchor #{anchor} in {linked.name}")
    return dead


def shell_texts(markdown: str) -> Iterator[str]:
    """The text of every fenced code block (continued lines joined) and of every inline code span."""
    for match in FENCE.finditer(markdown):
        yield match.group(2).replace("\\\n", " ")
    for match in INLINE_CODE.finditer(FENCE.sub("", markdown)):
        yield match.group(2).replace("\n", " ")


def commands_in(markdown: str, where: str = "") -> list[Command]:
    """Every ``cifar-resnet``, ``cifar-resnet-export`` or ``python -m cifar_resnet[.export]`` call in the
    code of a Markdown text, with its arguments up to the end of the line or a shell operator. A program
    name inside a sentence (``Another cifar-resnet process ...``) is not a call."""
    found = []
    for block in shell_texts(markdown):
        for line in block.splitlines():
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:  # not shell (an unbalanced quote in prose code)
                continue
            for i, token in enumerate(tokens):
                name = Path(token).name
                before = tokens[i - 1] if i else ";"
                starts = before in SHELL_OPERATORS or before in LAUNCHERS or before.endswith(":")
                if name in ("cifar-resnet", "cifar-resnet-export") and starts:
                    start = i + 1
                elif token in PROGRAMS and i > 0 and tokens[i - 1] == "-m":
                    name, start = PROGRAMS[token], i + 1
                else:
                    continue
                args = []
                for arg in tokens[start:]:
                    if arg in SHELL_OPERATORS:
                        break
                    args.append(arg)
                if args:
                    found.append(Command(name, tuple(args), f"{where}: {line.strip()}"))
    return found


def parse_error(parser: ArgumentParser, args: list[str]) -> str | None:
    """Why ``parser`` refuses ``args`` (``None`` if it accepts them). ``--help``, ``--version`` and
    ``--print_config`` end the parse with exit code 0, which counts as accepted."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit as exit_:
        return None if exit_.code in (0, None) else err.getvalue().strip() or f"exit code {exit_.code}"
    except Exception as exc:  # the CLI's parser raises instead of exiting (exit_on_error=False)
        return f"{type(exc).__name__}: {exc}"
    return None


def without_help(args: list[str]) -> list[str]:
    """``args`` without ``--help``/``-h``/``--version`` and ``--<key>.help CLASS``, which end a parse early (with
    exit code 0) and would let a misspelt flag before them pass unseen."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--help", "-h", "--version"):
            continue
        elif arg.startswith("--") and arg.endswith(".help"):
            skip = True
        else:
            out.append(arg)
    return out


def command_error(parser: ArgumentParser, args: list[str]) -> str | None:
    """Why the command's arguments do not parse: as shown, and, if it asks for help, without the help flags too
    (when something is left beyond the subcommand)."""
    error = parse_error(parser, args)
    rest = without_help(args)
    if error is None and rest != args and len(rest) > 1:
        error = parse_error(parser, rest)
    return error


def with_recipe_for_run_configs(args: tuple[str, ...]) -> list[str]:
    """``args`` with a missing ``runs/<name>/version_N/config.yaml`` replaced by ``configs/<name>.yaml``."""
    out = list(args)
    for i, arg in enumerate(out[:-1]):
        value = out[i + 1]
        match = RUN_CONFIG.search(value)
        if arg == "--config" and match and not (ROOT / value).exists():
            out[i + 1] = f"configs/{match.group(1)}.yaml"
    return out


@pytest.fixture(scope="module")
def parsers() -> dict[str, ArgumentParser]:
    """The parsers of ``cifar-resnet`` and ``cifar-resnet-export``, captured as their ``main`` builds them."""
    from cifar_resnet import cli, export

    def captured(main: Callable[[], object]) -> ArgumentParser:
        with warnings.catch_warnings():  # cli.run installs warning filters; keep them out of the other tests
            return capture_parser(main)

    return {"cifar-resnet": captured(lambda: cli.run([])), "cifar-resnet-export": captured(lambda: export.main([]))}


def test_docs_exist_and_show_commands() -> None:
    """The pages this test reads are there, and it finds commands in them (else it would check nothing)."""
    names = {path.name for path in DOCS}
    assert {"README.md", "recipes.md", "resume.md", "errors.md", "performance.md"} <= names
    commands = [c for path in DOCS for c in commands_in(path.read_text(encoding="utf-8"))]
    programs = {c.program for c in commands}
    subcommands = {c.args[0] for c in commands if c.program == "cifar-resnet"}
    assert programs == {"cifar-resnet", "cifar-resnet-export"}, programs
    assert {"fit", "test", "validate", "predict"} <= subcommands, subcommands


def test_links_and_anchors_resolve() -> None:
    dead = [problem for path in DOCS for problem in dead_links(path)]
    assert not dead, "dead links in the docs:\n" + "\n".join(dead)


def test_commands_parse(parsers: dict[str, ArgumentParser], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the docs' paths (configs/...) are relative to the repository
    failures = []
    for path in DOCS:
        for command in commands_in(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT))):
            error = command_error(parsers[command.program], with_recipe_for_run_configs(command.args))
            if error:
                failures.append(f"{command.where}\n    {error.splitlines()[0] if error else ''}")
    assert not failures, "commands in the docs that no longer parse:\n" + "\n".join(failures)


# Negative controls: the checks above catch what they are for.


def test_a_dead_link_and_a_dead_anchor_are_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Stopping a run\n\n## Stopping a run\n")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](other.md#stopping-a-run) [ok2](other.md#stopping-a-run-1) [web](https://example.org/x)\n"
        "[gone](missing.md) [bad anchor](other.md#stopping) `[not a link](nowhere.md)`\n"
        "```\n[also not a link](nowhere.md)\n```\n"
    )
    assert sorted(problem.split(": ", 2)[1] for problem in dead_links(page)) == ["(missing.md)", "(other.md#stopping)"]


def test_slugs_follow_github() -> None:
    assert slug("Time to accuracy: `make reproduce`") == "time-to-accuracy-make-reproduce"
    assert slug("Loading is safe; a config is code") == "loading-is-safe-a-config-is-code"
    assert slug("Several GPUs, several nodes") == "several-gpus-several-nodes"


def test_a_misspelt_flag_is_found(parsers: dict[str, ArgumentParser], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    text = (
        "```bash\n"
        "cifar-resnet fit --config configs/scratch.yaml \\\n  --trainer.max_epochz 3   # a typo\n"
        "srun .venv/bin/cifar-resnet fit --config configs/scratch.yaml --model.init_args.optimizer.init_args.lrr 1\n"
        "torchrun -m cifar_resnet fit --config configs/scratch.yaml --trainer.max_epochs 3 | tee log\n"
        "cifar-resnet-export a.ckpt model.onnx --formt onnx\n"
        "cifar-resnet fit --config configs/scratch.yaml --trainer.max_epochz 3 --help\n"
        "cifar-resnet fit --config configs/scratch.yaml --model.help ScratchResNet\n"
        "```\n"
        "and `cifar-resnet test --config configs/scratch.yaml --ckpt_path last`, not `Another cifar-resnet process`.\n"
    )
    commands = commands_in(text)
    assert [c.args[-1] for c in commands] == ["3", "1", "3", "onnx", "--help", "ScratchResNet", "last"], commands
    errors = [command_error(parsers[c.program], list(c.args)) for c in commands]
    assert [e is not None for e in errors] == [True, True, False, True, True, False, False], errors
    assert "max_epochz" in errors[0] and "formt" in errors[3]


def test_every_docs_page_is_linked_from_the_readme() -> None:
    """A newcomer finds every page from the README's table."""
    readme = without_code((ROOT / "README.md").read_text(encoding="utf-8"))
    linked = {(ROOT / m.group(1).partition("#")[0]).resolve() for m in LINK.finditer(readme)}
    unlinked = [path.name for path in DOCS[1:] if path.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


def test_every_module_says_where_its_tests_are() -> None:
    page = (ROOT / "docs" / "development.md").read_text()
    section = page.split("### Where the tests of each module are", 1)[1].split("\n#", 1)[0]
    rows = [line.split("|")[1:3] for line in section.splitlines() if line.startswith("| `")]
    named = {name for code, _ in rows for name in re.findall(r"`([^`]+)`", code)}
    package = ROOT / "src" / "cifar_resnet"
    modules = {str(p.relative_to(package)) for p in package.rglob("*.py")}
    assert not modules - named, f"modules not in docs/development.md's test table: {sorted(modules - named)}"
    gone = sorted(name for name in named - modules if not (ROOT / name).exists())
    assert not gone, f"the test table names code that does not exist: {gone}"
    tests = {name for _, where in rows for name in re.findall(r"`(tests/[^`]+)`", where)}
    assert len(tests) >= 20 and not [t for t in tests if not (ROOT / t).is_file()], sorted(t for t in tests if not (ROOT / t).is_file())
