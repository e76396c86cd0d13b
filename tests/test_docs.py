"""The tutorials in docs/ cannot rot: their code is the code, their commands run.

docs/layernorm.md (English) and docs/layernorm.zh.md (its Chinese translation)
follow these rules, checked here:

(a) A fenced block preceded by `<!-- quote: PATH:NAME -->` is a quotation of
    the function or kernel NAME in PATH (relative to the repo root) and must
    equal its source exactly: for .py the lines of `def NAME` (via ast), for
    .cu/.cuh the lines from the definition `... NAME(` (or `struct NAME`, with
    a `template <...>` line before it) at the start of a line to its closing
    brace.
(b) The translation has the same headings (same count, same levels, in the
    same order) and the same fenced blocks, byte for byte, with the same
    `<!-- ... -->` markers, in the same order. (The prose is checked by people.)
(c) Every ```bash block runs: each line is run from the repo root as a
    subprocess and must exit 0, except blocks marked `<!-- gpu -->` (they need
    an NVIDIA GPU) and `<!-- setup -->` (the install, which must be the
    README's own install command and is not rerun here). The subprocesses use
    this interpreter and import llmcu from this checkout.
(d) README.zh.md's quick-start commands are README.md's, in the same order.
"""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIALS = [DOCS / "layernorm.md", DOCS / "layernorm.zh.md"]

FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(.*?)\s*-->")
HEADING = re.compile(r"^(#{1,6})\s+\S", re.M)


def blocks(text):
    """[(marker or None, language, body)] for every fenced block, in order.
    The marker is an HTML comment on the line right before the opening fence."""
    found = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        marker = MARKER.fullmatch(before)
        found.append((marker.group(1) if marker else None, m.group(1).strip(), m.group(2)))
    return found


def headings(text):
    """Heading levels in order, outside fenced blocks."""
    return [len(m.group(1)) for m in HEADING.finditer(FENCE.sub("", text))]


def quoted_source(path: Path, name: str) -> str:
    """The source text of function/kernel `name` in `path`, ending with a newline."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    if path.suffix == ".py":
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                first = min([node.lineno] + [d.lineno for d in node.decorator_list])
                return "".join(lines[first - 1:node.end_lineno])
        raise LookupError(f"{path}: no def or class {name}")
    start = (re.search(rf"^(?![ \t]|//|#)[^\n;]*\b{re.escape(name)}\s*\(", text, re.M)
             or re.search(rf"^(template\s*<[^\n]*>\n)?struct\b[^\n;]*\b{re.escape(name)}\b[^\n;]*{{", text, re.M))
    if start is None:
        raise LookupError(f"{path}: no definition of {name} at the start of a line")
    brace = text.index("{", start.start())
    depth = 0
    for i in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            end = text.find("\n", i)
            return text[start.start():(len(text) if end < 0 else end + 1)]
    raise LookupError(f"{path}: unbalanced braces after {name}")


def quotes(doc: Path):
    return [(marker[len("quote:"):].strip(), body)
            for marker, _, body in blocks(doc.read_text(encoding="utf-8")) if marker and marker.startswith("quote:")]


def bash_commands(doc: Path, skip=("gpu", "setup")):
    commands = []
    for marker, lang, body in blocks(doc.read_text(encoding="utf-8")):
        if lang == "bash" and marker not in skip:
            commands += [line.strip() for line in body.splitlines()
                         if line.strip() and not line.strip().startswith("#")]
    return commands


@pytest.mark.parametrize("doc", TUTORIALS, ids=lambda p: p.name)
def test_quoted_code_matches_source(doc):
    found = quotes(doc)
    assert found, f"{doc.name} quotes no code"
    stale = []
    for ref, body in found:
        path, _, name = ref.rpartition(":")
        source = quoted_source(ROOT / path, name)
        if body != source:
            stale.append(ref)
    assert not stale, (f"{doc.name}: these quotations no longer match their source: {stale}; "
                       f"copy the current code into the blocks after <!-- quote: ... -->")


def test_translation_has_same_structure_and_code():
    en, zh = (doc.read_text(encoding="utf-8") for doc in TUTORIALS)
    assert headings(zh) == headings(en), (
        f"headings differ: English {headings(en)}, Chinese {headings(zh)}")
    en_blocks, zh_blocks = blocks(en), blocks(zh)
    assert len(zh_blocks) == len(en_blocks), (
        f"{len(en_blocks)} code blocks in English, {len(zh_blocks)} in Chinese")
    for i, (a, b) in enumerate(zip(en_blocks, zh_blocks)):
        assert a == b, f"code block {i} differs between the English and the Chinese tutorial:\n{a}\n{b}"


def test_setup_block_is_the_readme_install():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for doc in TUTORIALS:
        setup = [body for marker, lang, body in blocks(doc.read_text(encoding="utf-8")) if marker == "setup"]
        assert setup, f"{doc.name} has no <!-- setup --> block"
        for body in setup:
            for line in body.splitlines():
                assert line.strip() in readme, f"{doc.name}: setup command {line!r} is not README.md's"


def _run_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


COMMANDS = bash_commands(TUTORIALS[0]) if TUTORIALS[0].is_file() else []


def test_tutorial_has_commands():
    assert TUTORIALS[0].is_file(), f"{TUTORIALS[0]} is missing"
    assert len(COMMANDS) >= 5, COMMANDS
    assert all(c.startswith("python ") for c in COMMANDS), COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_tutorial_command_runs(command):
    proc = subprocess.run(command, shell=True, cwd=ROOT, env=_run_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (f"`{command}` exited {proc.returncode}:\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def _quick_start_commands(path: Path):
    text = path.read_text(encoding="utf-8")
    m = re.search(r"^##[^\n]*Quick start[^\n]*\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"{path.name} has no '## ... Quick start' section"
    return [body for _, lang, body in blocks(m.group(1)) if lang == "bash"]


def test_readme_zh_quick_start_matches_readme():
    en = _quick_start_commands(ROOT / "README.md")
    zh = _quick_start_commands(ROOT / "README.zh.md")
    assert en, "README.md's quick start has no bash block"
    assert zh == en, f"README.zh.md's quick-start commands {zh} differ from README.md's {en}"


def _llmcu_commands(path: Path):
    """The quick start's `llmcu ...` commands, parsed by llmcu's own command line."""
    import shlex
    from llmcu.cli import build_parser
    commands = []
    for body in _quick_start_commands(path):
        for line in body.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and words[0] == "llmcu":
                    commands.append(build_parser().parse_args(words[1:]))
    return commands


def test_readme_quick_start_samples_the_model_it_trains():
    """The sample command reads the file the train command writes (-o DIR, -x steps, no -n:
    DIR/model_%08d.bin of the last step), and the run has a warmup."""
    from llmcu import checkpoint
    commands = {a.command: a for a in _llmcu_commands(ROOT / "README.md")}
    train, sample = commands["train"], commands["sample"]
    assert train.output_dir and train.checkpoint_every == 0 and train.warmup_iters > 0
    assert sample.model == checkpoint.model_path(train.output_dir, train.max_steps)


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(tmp_path, shared_dir):
    """The quick start's commands, as written, in a fresh directory (3.5 minutes on a quiet
    2-core machine): the data from ../shared instead of the download, then train and sample."""
    import shlex
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = [sys.executable, "-m", "llmcu"]
    for body in _quick_start_commands(ROOT / "README.md"):
        for line in body.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part)
                if not words or words[0] != "llmcu":
                    continue  # the install
                if words[1] == "prepare":
                    words += ["--input", str(shared_dir / "datasets/tinyshakespeare/input.txt")]
                r = subprocess.run(run + words[1:], cwd=tmp_path, env=env, capture_output=True,
                                   text=True, timeout=1800)
                assert r.returncode == 0, (part, r.stdout[-3000:], r.stderr[-3000:])
    assert r.stdout.startswith("ROMEO:") and len(r.stdout) > len("ROMEO:") + 20, r.stdout


def test_readmes_link_both_tutorials():
    for readme in ("README.md", "README.zh.md"):
        text = (ROOT / readme).read_text(encoding="utf-8")
        for target in ("docs/layernorm.md", "docs/layernorm.zh.md"):
            assert f"]({target})" in text, f"{readme} does not link {target}"
