"""The docs check: every shell and Python snippet of the README and docs/ is held to the product, so that the
documentation cannot drift from it.

Shell snippets: each `vera`, `vera panel`, `vera-engine` (also as `python -m vera_engine` and under `torchrun`),
`python -m vera_*` module and `python <repository script>` command is parsed by that program's own argparse
parser (a renamed or removed flag, a wrong choice, a missing required argument fail here); `bash .ci/...` scripts
and repository paths (`/path/to/vera-edit/...`) must exist; `pip install` must name extras pyproject.toml has and
must not install `vera-edit` by name (it is not on the public index). Other programs (ray, nuke, pip's own
packages, export, ...) are left alone.

Python snippets: each must compile; what it imports from vera_engine / vera_plugin / vera_proto must exist, with
every attribute it reaches through them and every keyword it passes to them. A snippet preceded by
``<!-- docs-check: run -->`` is also run (in a scratch folder, on the CPU); ``<!-- docs-check: skip -->`` skips
one that cannot be checked.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import importlib
import importlib.util
import inspect
import re
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PLACEHOLDER_REPO = "/path/to/vera-edit/"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "zsh"}
PYTHON_LANGUAGES = {"python", "py", "python3"}
# Unlabelled blocks are shell when they start with one of these.
_SHELL_STARTS = ("vera", "python", "bash", "pip", "OMP_", "MKL_", "taskset", "torchrun", ".venv/", "ray ")

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str  # "shell" or "python"
    text: str
    marker: str  # "", "run" or "skip"

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


_FENCE = re.compile(r"^(\s*)```\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"<!--\s*docs-check:\s*(run|skip)\s*-->")


def snippets(path: Path) -> list[Snippet]:
    """The fenced code blocks of a markdown file that hold shell or Python."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Snippet] = []
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = len(opening.group(1)), opening.group(2).lower()
        end = index + 1
        while end < len(lines) and not re.match(r"^\s*```\s*$", lines[end]):
            end += 1
        block = lines[index + 1 : end]
        body = "\n".join(line[indent:] if not line[:indent].strip() else line for line in block)
        before = next((lines[i] for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marker = _MARKER.search(before)
        if language in SHELL_LANGUAGES or (not language and body.lstrip().startswith(_SHELL_STARTS)):
            kind = "shell"
        elif language in PYTHON_LANGUAGES:
            kind = "python"
        else:
            kind = ""
        if kind:
            found.append(Snippet(path, index + 1, kind, body, marker.group(1) if marker else ""))
        index = end + 1
    return found


ALL_SNIPPETS = [snippet for doc in DOCS for snippet in snippets(doc)]


def test_the_docs_have_snippets_to_check() -> None:
    kinds = {(s.path.name, s.language) for s in ALL_SNIPPETS}
    assert ("README.md", "shell") in kinds and ("README.md", "python") in kinds
    assert any(s.marker == "run" for s in ALL_SNIPPETS), "some Python snippet is run"


# ---------------------------------------------------------------------------------------------------------
# Shell


def _strip_comment(line: str) -> str:
    """The line without its `#` comment (a `#` inside quotes or a word, like `plate.####.exr`, stays)."""
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def shell_commands(text: str) -> Iterator[list[str]]:
    """Each simple command of a shell snippet as its words (continuation lines joined, comments dropped, `;`,
    `&&`, `||` and `|` split, `<placeholder>`s kept as one word)."""
    joined = re.sub(r"\\\n", " ", text)
    for raw in joined.splitlines():
        line = re.sub(r"<([A-Za-z][\w .-]*)>", r"\1", _strip_comment(raw)).strip()
        line = line.removeprefix("$ ")  # a prompt shown before the command
        if not line:
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        lexer.commenters = ""
        words: list[str] = []
        for token in lexer:
            if token in (";", "&&", "||", "|", "&"):
                if words:
                    yield words
                words = []
            else:
                words.append(token)
        if words:
            yield words


def _without_optional_brackets(words: list[str]) -> list[str]:
    """`[--frames 8 --bits 8]` (optional arguments shown in brackets) -> the arguments themselves."""
    out = []
    for word in words:
        if word.startswith("[-"):
            word = word[1:]
        if word.endswith("]") and "[" not in word:
            word = word[:-1]
        if word:
            out.append(word)
    return out


class _Parsed(Exception):
    """Raised from a patched parse_args: the program's parser accepted the words."""


@contextlib.contextmanager
def _parse_instead_of_run(words: list[str]) -> Iterator[None]:
    """While active, the first `ArgumentParser.parse_args` call parses `words` and stops the program."""
    original = argparse.ArgumentParser.parse_args

    def parse(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> Any:
        original(self, words, namespace)
        raise _Parsed

    argparse.ArgumentParser.parse_args = parse  # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]


def _check_with_parser(parser: argparse.ArgumentParser, words: list[str], what: str) -> None:
    try:
        parser.parse_args(words)
    except SystemExit as exc:
        if exc.code in (0, None):  # --help, --version
            return
        raise AssertionError(f"{what} {' '.join(words)!r}: the {parser.prog!r} parser refuses it") from exc


def _check_main(main: Any, words: list[str], what: str) -> None:
    """Run `main()` up to its argument parsing, with `words` as its arguments."""
    with _parse_instead_of_run(words):
        try:
            main()
        except _Parsed:
            return
        except SystemExit as exc:
            if exc.code in (0, None):  # --help
                return
            raise AssertionError(f"{what} {' '.join(words)!r}: its parser refuses it") from exc
    raise AssertionError(
        f"{what}: main() returned without parsing arguments; the docs check cannot follow it"
    )


def _repository_path(word: str) -> Path | None:
    if word.startswith(PLACEHOLDER_REPO):
        return REPO / word.removeprefix(PLACEHOLDER_REPO)
    if word.startswith(("bench/", "proto/", "tests/", ".ci/", "engine/", "plugin/", "nuke_gizmos/", "docs/")):
        return REPO / word
    return None


def _vera(words: list[str]) -> None:
    from vera_plugin import cli

    if words[:1] == ["panel"]:
        pytest.importorskip("PySide6")
        from vera_plugin.panel import build_parser

        _check_with_parser(build_parser(), words[1:], "vera panel")
        return
    _check_with_parser(cli.build_parser(), cli._attach_negative_values(words), "vera")


def _vera_engine(words: list[str]) -> None:
    from vera_engine.tools.cli import build_parser

    _check_with_parser(build_parser(), words, "vera-engine")


def _python(words: list[str]) -> None:
    """`python -m MODULE ARGS` or `python SCRIPT ARGS`."""
    while words and words[0].startswith("-") and words[0] != "-m":
        words = words[1:]  # interpreter options such as -u
    if not words:
        return
    if words[0] == "-m":
        module, args = words[1], words[2:]
        if module == "vera_engine":
            _vera_engine(args)
        elif module.startswith(("vera_engine.", "vera_plugin.", "vera_proto.")):
            _check_main(importlib.import_module(module).main, args, f"python -m {module}")
        elif module == "pip":
            _pip(args)
        return
    script = _repository_path(words[0])
    if script is None:
        return
    assert script.is_file(), f"{words[0]}: no such file in the repository"
    if script.suffix == ".py" and "def main(" in script.read_text():
        spec = importlib.util.spec_from_file_location(f"docs_check_{script.stem}", script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(script.parent))
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(script.parent))
        _check_main(module.main, words[1:], f"python {words[0]}")


def _pip(words: list[str]) -> None:
    if not words or words[0] != "install":
        return
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    for word in words[1:]:
        name = re.split(r"[\[<>=!~ ]", word, maxsplit=1)[0]
        assert name.lower().replace("_", "-") != "vera-edit", (
            f"pip install {word!r}: vera-edit is not on the public index; install it from the checkout "
            "(pip install -e '.[extras]' in the repository, or pip install /path/to/vera-edit)"
        )
        match = re.fullmatch(r"(?:\.|/path/to/vera-edit)\[([\w,-]+)\]", word)
        if match:
            unknown = set(match.group(1).split(",")) - extras
            assert not unknown, (
                f"pip install {word!r}: pyproject.toml has no extra {sorted(unknown)}; it has {sorted(extras)}"
            )


def check_shell_command(words: list[str]) -> None:
    """Resolve one command against the product (see the module docstring)."""
    words = _without_optional_brackets(words)
    # Prefixes that run the rest: assignments, nice/time/sudo/env, taskset -c N, torchrun's own options.
    while words:
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]) or words[0] in (
            "sudo",
            "time",
            "nice",
            "env",
        ):
            words = words[1:]
        elif words[0] == "taskset":
            words = words[3:]
        elif words[0] == "torchrun":
            rest = words[1:]
            while rest and rest[0].startswith("--") and rest[0] != "-m":
                rest = rest[2:] if "=" not in rest[0] and rest[0] != "--standalone" else rest[1:]
            words = ["python", *rest]
        else:
            break
    if not words:
        return
    program = words[0].rsplit("/", 1)[-1] if words[0].startswith((".venv/", "./", "/")) else words[0]
    for word in words[1:]:
        path = _repository_path(word)
        if path is not None and word.startswith(PLACEHOLDER_REPO):
            assert path.exists(), f"{word}: no such path in the repository"
    if program == "vera":
        _vera(words[1:])
    elif program == "vera-engine":
        _vera_engine(words[1:])
    elif program in ("python", "python3"):
        _python(words[1:])
    elif program == "pip":
        _pip(words[1:])
    elif program == "bash" and len(words) > 1 and words[1].startswith(".ci/"):
        script = REPO / words[1]
        assert script.is_file(), f"{words[1]}: no such script"
        if words[1] == ".ci/demo":
            _vera_engine(["demo", *words[2:]])  # .ci/demo passes its arguments to `vera-engine demo`


SHELL_SNIPPETS = [s for s in ALL_SNIPPETS if s.language == "shell" and s.marker != "skip"]


@pytest.mark.parametrize("snippet", SHELL_SNIPPETS, ids=[s.where for s in SHELL_SNIPPETS])
def test_shell_snippet_commands_resolve(snippet: Snippet) -> None:
    for words in shell_commands(snippet.text):
        try:
            check_shell_command(words)
        except AssertionError as exc:
            raise AssertionError(f"{snippet.where}: {exc}") from None


# Inline commands (`vera edit --takes N` in a sentence): not whole commands, so only their subcommand and flags
# are resolved, and `pip install` as above.
_INLINE = re.compile(r"`((?:vera|vera-engine|pip install|python -m vera_engine) [^`]*)`")


def _options_of(parser: argparse.ArgumentParser, words: list[str]) -> tuple[str, set[str]]:
    """The (sub)command `words` name and every option string it takes."""
    name = parser.prog
    while True:
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None:
            break
        if not words or words[0] not in sub.choices:
            # Prose naming a flag without its subcommand (`vera --tls`): any subcommand's options count.
            options = {o for action in parser._actions for o in action.option_strings}
            for choice in sub.choices.values():
                options |= _options_of(choice, [])[1]
            return name, options
        parser, words, name = sub.choices[words[0]], words[1:], f"{name} {words[0]}"
    return name, {option for action in parser._actions for option in action.option_strings}


def check_inline_command(text: str) -> None:
    words = _without_optional_brackets(shlex.split(re.sub(r"<([A-Za-z][\w .-]*)>", r"\1", text)))
    if words[:1] == ["pip"]:
        _pip(words[1:])
        return
    if words[:2] == ["python", "-m"]:
        words = ["vera-engine", *words[3:]]
    if words[:2] == ["vera", "panel"]:
        pytest.importorskip("PySide6")
        from vera_plugin.panel import build_parser as parser_of

        name, options = "vera panel", {o for a in parser_of()._actions for o in a.option_strings}
    else:
        if words[0] == "vera":
            from vera_plugin.cli import build_parser
        else:
            from vera_engine.tools.cli import build_parser
        name, options = _options_of(build_parser(), words[1:])
    flags = [part for w in words[1:] if w.startswith("--") for part in w.split("/")]  # `--window/--overlap`
    unknown = [f for f in flags if f.split("=")[0] not in options]
    assert not unknown, f"`{text}`: {name} has no option {unknown}"


INLINE = [
    (doc, line_number, match.group(1))
    for doc in DOCS
    for line_number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
    for match in _INLINE.finditer(line)
]


@pytest.mark.parametrize(
    ("doc", "line", "text"), INLINE, ids=[f"{d.relative_to(REPO)}:{n}" for d, n, _ in INLINE]
)
def test_inline_commands_resolve(doc: Path, line: int, text: str) -> None:
    try:
        check_inline_command(text)
    except (AssertionError, ValueError) as exc:
        raise AssertionError(f"{doc.relative_to(REPO)}:{line}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------
# Python

_OURS = ("vera_engine", "vera_plugin", "vera_proto")


def _imported(tree: ast.AST) -> dict[str, Any]:
    """Names a snippet binds to objects of our packages (modules, classes, functions), imported here."""
    names: dict[str, Any] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in _OURS:
            module = importlib.import_module(node.module or "")
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        names[alias.asname or alias.name] = importlib.import_module(
                            f"{node.module}.{alias.name}"
                        )
                        continue
                    except ImportError:
                        raise AssertionError(
                            f"from {node.module} import {alias.name}: no such name"
                        ) from None
                names[alias.asname or alias.name] = getattr(module, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in _OURS:
                    module = importlib.import_module(alias.name)
                    names[alias.asname or alias.name.split(".")[0]] = (
                        module if alias.asname else importlib.import_module(alias.name.split(".")[0])
                    )
    # `with Class(...) as name`: `name` is an instance of our class (its methods are checked too).
    for node in ast.walk(tree):
        if isinstance(node, ast.With):
            for item in node.items:
                call, target = item.context_expr, item.optional_vars
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Name)
                    and isinstance(target, ast.Name)
                    and inspect.isclass(names.get(call.func.id))
                ):
                    names[target.id] = _Instance(names[call.func.id])
    return names


@dataclass(frozen=True)
class _Instance:
    cls: type


def _resolve(node: ast.expr, names: dict[str, Any]) -> Any:
    """The object an expression like `module.function` or `instance.method` names, or None if not ours."""
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, names)
        if base is None:
            return None
        owner = base.cls if isinstance(base, _Instance) else base
        if not hasattr(owner, node.attr):
            raise AssertionError(
                f"{ast.unparse(node)}: {getattr(owner, '__name__', owner)} has no {node.attr!r}"
            )
        value = getattr(owner, node.attr)
        return ("method", value) if isinstance(base, _Instance) else value
    return None


def check_python(text: str) -> None:
    tree = ast.parse(text)
    names = _imported(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            _resolve(node, names)
        if isinstance(node, ast.Call):
            target = _resolve(node.func, names)
            if target is None:
                continue
            method = isinstance(target, tuple)
            function = target[1] if method else target
            if isinstance(function, _Instance) or not callable(function):
                continue
            try:
                signature = inspect.signature(function)
            except (TypeError, ValueError):
                continue
            positional = [None] * (len(node.args) + (1 if method else 0))
            keywords = {kw.arg: None for kw in node.keywords if kw.arg is not None}
            try:
                signature.bind_partial(*positional, **keywords)
            except TypeError as exc:
                raise AssertionError(f"{ast.unparse(node)[:80]}: {exc}") from None


PYTHON_SNIPPETS = [s for s in ALL_SNIPPETS if s.language == "python" and s.marker != "skip"]


@pytest.mark.parametrize("snippet", PYTHON_SNIPPETS, ids=[s.where for s in PYTHON_SNIPPETS])
def test_python_snippet_resolves(snippet: Snippet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        check_python(snippet.text)
    except (AssertionError, SyntaxError, ImportError) as exc:
        raise AssertionError(f"{snippet.where}: {exc}") from None
    if snippet.marker == "run":
        monkeypatch.chdir(tmp_path)
        code = compile(snippet.text, snippet.where, "exec")
        exec(code, {"__name__": "__docs_check__", "__builtins__": builtins})


# ---------------------------------------------------------------------------------------------------------
# The checker itself


def test_the_checker_catches_drift() -> None:
    for bad in (
        "vera edit --engine x --plate p --frames 1-2 --prompt x --out o --no-such-flag",
        "vera-engine serve --model default",  # --spool is required
        "vera-engine train --data D --out O --preset no-such-preset --lr fast",
        "python -m vera_engine.training.data.synthetic --out D --tasks juggling",
        "python bench/no_such_bench.py",
        "pip install 'vera-edit[cluster]'",
        "pip install -e '.[gui]'",
        "bash .ci/demo --outdir x",
        "nuke -t /path/to/vera-edit/nuke_gizmos/no_such_selftest.py",
    ):
        with pytest.raises(AssertionError):
            for words in shell_commands(bad):
                check_shell_command(words)
    for good in (
        "vera edit --engine gpu-box:50051 --plate 'shot/plate.####.exr' --frames -2-1 --prompt x --out o # c",
        "OMP_NUM_THREADS=1 python bench/bench_step.py --config tiny --device cpu",
        "torchrun --nproc_per_node 2 -m vera_engine train --data D --out O",
        "pip install -e '.[engine,ui]' ; bash .ci/demo --out DIR",
        "python -m vera_engine.training.data.synthetic --out D [--frames 8 --bits 8]",
    ):
        for words in shell_commands(good):
            check_shell_command(words)
    for bad_inline in (
        "vera edit --takes N --no-such",
        "pip install 'vera-edit[cluster]'",
        "vera-engine train --lrate 1",
    ):
        with pytest.raises(AssertionError):
            check_inline_command(bad_inline)
    check_inline_command("vera edit --takes N")
    check_inline_command("vera --tls")  # prose: a flag of the vera commands
    check_inline_command("vera-engine train --init OLD --fresh-text-encoder --preset vera-tiny ...")
    for bad_python in (
        "from vera_plugin import NoSuchThing",
        "from vera_plugin.client import EngineClient\nwith EngineClient('x') as e:\n    e.submit_file('p', [1])",
        "from vera_plugin.client import EngineClient\nEngineClient('x', tls=True, certificate='c')",
    ):
        with pytest.raises(AssertionError):
            check_python(bad_python)
