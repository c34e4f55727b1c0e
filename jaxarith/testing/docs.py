"""Doc-test runner: extract the ```bash / ```python blocks of Markdown pages (and the command
lines written in ``configs/*.yaml`` headers) and run them against local fixture models.

Markers, an HTML comment on the line(s) just before a fenced block (invisible on GitHub):

- ``<!-- doctest: skip reason="needs a TPU pod" -->``: the next block is not run; the test
  reports it as skipped with the reason.
- ``<!-- doctest: file=merge.yaml -->``: the next block (any language, e.g. ```yaml) is written
  to that file in the page's working directory, for later commands to read.
- ``<!-- doctest: setup`` ... ``-->``: the Python code inside the comment runs at that point, in
  the page's namespace (hidden set-up, e.g. defining variables an example uses).

In a YAML config, a header line ``#   python -m train ...`` is a command; a header line
``# doctest: skip reason=...`` before it skips it.

How blocks run (see :class:`DocRunner`): every page gets a fresh working directory holding the
fixture models under the names the docs use (hub ids such as ``meta-llama/Llama-3.2-1B``,
placeholders such as ``MODEL`` or ``path/to/hf_model``: :data:`FIXTURE_NAMES`), ``configs/`` and
``scripts/`` of the repository, and ``.venv/bin/{python,jaxarith,activate}`` shims. ``/tmp/`` in
a block means one temporary directory shared by all pages (as /tmp is shared on a machine: a run
that one page trains, another page's identical command finds finished). Python blocks of a page
share one namespace; bash commands of the form ``jaxarith ...``, ``python -m jaxarith|train ...``
and ``python -c ...`` run in this process (no new interpreter, compiled programs are reused);
anything else (pipes, redirections, other programs) runs in ``bash -e`` with the shims first on
``PATH``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
import types

# Names the docs use for models -> which fixture stands in for them. Hub ids become local
# directories of the same name, so every command runs offline on tiny models.
FIXTURE_NAMES: dict[str, str] = {
    # hub ids
    "meta-llama/Llama-3.2-1B": "llama",
    "meta-llama/Llama-3.2-1B-Instruct": "llama_b",
    # placeholders
    "MODEL": "llama", "BASE": "llama", "LARGE_BASE": "llama", "SMALL_BASE": "llama",
    "INSTRUCT": "llama_b", "TRAINED": "llama_c", "SMALL_TUNED": "llama_b",
    "LARGE_TUNED": "llama_b", "CHAT": "llama_b", "TUNED": "llama_b", "REF": "llama",
    "path/to/hf_model": "llama", "path/to/base": "llama", "path/to/instruct": "llama_b",
    "path/to/model": "llama", "path/to/other": "llama_c", "base": "llama", "math": "llama_b",
    "code": "llama_c", "instruct": "llama_b",
}

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)[^\n]*$")
_MARKER = re.compile(r"<!--\s*doctest:\s*(?P<body>.*?)-->", re.S)
_RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "console": "bash",
              "python": "python", "py": "python"}


@dataclasses.dataclass(frozen=True)
class Block:
    """One runnable unit of a document."""

    path: str  # the document
    line: int  # 1-based line of the block's first code line
    lang: str  # "bash", "python", "setup" (hidden python) or "file"
    code: str
    skip: str | None = None  # reason, when marked skip
    file: str | None = None  # for lang == "file": where to write ``code``

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def _parse_marker(body: str) -> dict[str, str]:
    """``skip reason="..."`` / ``file=x.yaml`` / ``setup\\ncode`` -> a dict."""
    body = body.strip()
    if body.startswith("setup"):
        return {"setup": textwrap.dedent(body[len("setup"):]).strip("\n")}
    out: dict[str, str] = {}
    m = re.match(r"skip\b\s*(?:reason\s*=\s*)?(?P<r>.*)$", body, re.S)
    if m:
        out["skip"] = m["r"].strip().strip("\"'") or "marked skip"
        return out
    m = re.match(r"file\s*=\s*(?P<f>\S+)", body)
    if m:
        out["file"] = m["f"].strip("\"'")
        return out
    raise ValueError(f"unknown doctest marker {body!r} (expected skip reason=..., file=..., "
                     "or setup)")


def extract_markdown(path: str, text: str | None = None) -> list[Block]:
    """The runnable blocks of a Markdown file, in order (markers applied)."""
    if text is None:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lines = text.splitlines()
    blocks: list[Block] = []
    pending: dict[str, str] = {}
    i = 0
    while i < len(lines):
        line = lines[i]
        if "<!--" in line and "doctest:" in line:
            j, chunk = i, line
            while "-->" not in chunk and j + 1 < len(lines):
                j += 1
                chunk += "\n" + lines[j]
            for m in _MARKER.finditer(chunk):
                try:
                    marker = _parse_marker(m["body"])
                except ValueError as e:
                    raise ValueError(f"{path}:{i + 1}: {e}") from None
                if "setup" in marker:
                    blocks.append(Block(path, i + 1, "setup", marker["setup"]))
                else:
                    pending.update(marker)
            i = j + 1
            continue
        m = _FENCE.match(line)
        if m:
            fence, lang = m["fence"], m["lang"].lower()
            start, body = i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(fence):
                body.append(lines[i])
                i += 1
            code = textwrap.dedent("\n".join(body)) + "\n"
            if "file" in pending:
                blocks.append(Block(path, start + 1, "file", code, file=pending["file"]))
            elif lang in _RUN_LANGS:
                blocks.append(Block(path, start + 1, _RUN_LANGS[lang], code,
                                    skip=pending.get("skip")))
            pending = {}
        elif line.strip():
            pending = {}  # a marker applies only to the block right after it
        i += 1
    return blocks


def extract_config(path: str) -> list[Block]:
    """Command lines written in a YAML config's header comment (``#   python -m train ...``)."""
    blocks, skip, lines = [], None, []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines) and lines[i].startswith("#"):
        text = lines[i].lstrip("#").strip()
        m = re.match(r"doctest:\s*(.*)$", text)
        if m:
            skip = _parse_marker(m[1]).get("skip")
        elif re.match(r"(python -m train|jaxarith )", text):
            start, cmd = i, text
            while cmd.endswith("\\") and i + 1 < len(lines):
                i += 1
                cmd = cmd[:-1].rstrip() + " " + lines[i].lstrip("#").strip()
            blocks.append(Block(path, start + 1, "bash", cmd + "\n", skip=skip))
            skip = None
        i += 1
    return blocks


def commands(code: str) -> list[str]:
    """Logical command lines of a bash block: continuations joined, blank/comment lines dropped."""
    out, cur = [], ""
    for raw in code.splitlines():
        cur += raw
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        if cur.strip() and not cur.strip().startswith("#"):
            out.append(cur.strip())
        cur = ""
    if cur.strip():
        out.append(cur.strip())
    return out


class DocFailure(AssertionError):
    """A documented example failed: names the block, the command and its output."""


_SHELL_CHARS = re.compile(r"[|><;&`$(){}]")


def _needs_shell(cmd: str, argv: list[str]) -> bool:
    """Whether ``cmd`` uses the shell (pipes, redirections, ``$``, ``~``) outside quotes."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.commenters = "#"
    tokens = list(lex)
    if any(t and set(t) <= set("();<>|&") for t in tokens):
        return True
    python_c = len(argv) == 3 and argv[1] == "-c"
    return not python_c and ("$" in cmd or "`" in cmd or cmd.startswith("~") or " ~" in cmd)

_IN_PROCESS = re.compile(r"^(?:\.venv/bin/)?(?:jaxarith|python3?)\b")


class DocRunner:
    """Runs the blocks of one document in its own working directory.

    Args:
      workdir: an empty directory for this document.
      fixtures: fixture name -> model directory (see :data:`FIXTURE_NAMES`).
      repo: the repository root (``configs/`` and ``scripts/`` are linked from it).
      tmp: what ``/tmp/`` in a block stands for (default: ``workdir/tmp``).
    """

    def __init__(self, workdir: str, fixtures: dict[str, str], repo: str,
                 tmp: str | None = None):
        self.workdir = os.path.abspath(workdir)
        self.tmp = os.path.abspath(tmp or os.path.join(self.workdir, "tmp"))
        self.repo = repo
        # the page's namespace is a real module, so dataclasses & co. can look it up
        self.module = types.ModuleType(f"doctest_{abs(hash(self.workdir))}")
        self.ns: dict = self.module.__dict__
        self.env_changes: dict[str, str | None] = {}
        os.makedirs(self.tmp, exist_ok=True)
        for name, fixture in FIXTURE_NAMES.items():
            link = os.path.join(self.workdir, name)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(fixtures[fixture], link)
        for d in ("configs", "scripts"):
            os.symlink(os.path.join(repo, d), os.path.join(self.workdir, d))
        bindir = os.path.join(self.workdir, ".venv", "bin")
        os.makedirs(bindir)
        for name, body in (("python", f'exec {sys.executable} "$@"'),
                           ("python3", f'exec {sys.executable} "$@"'),
                           ("jaxarith", f'exec {sys.executable} -m jaxarith "$@"')):
            with open(os.path.join(bindir, name), "w") as f:
                f.write(f"#!/bin/sh\n{body}\n")
            os.chmod(os.path.join(bindir, name), 0o755)
        with open(os.path.join(bindir, "activate"), "w") as f:
            f.write(f'export PATH="{bindir}:$PATH"\n')
        self.bindir = bindir

    # ------------------------------------------------------------------ helpers
    def _subst(self, code: str) -> str:
        return re.sub(r"(?<![\w./])/tmp/", self.tmp + "/", code)

    @contextlib.contextmanager
    def _here(self):
        old = os.getcwd()
        os.chdir(self.workdir)
        try:
            yield
        finally:
            os.chdir(old)

    def _fail(self, block: Block, what: str, out: str) -> None:
        tail = "\n".join(out.strip().splitlines()[-25:])
        raise DocFailure(f"{block.where}: {what}\n--- output (last lines) ---\n{tail}")

    def close(self) -> None:
        """Undo ``export``s made by the document's commands; forget its module."""
        sys.modules.pop(self.module.__name__, None)
        for k, v in self.env_changes.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    # ------------------------------------------------------------------ running
    def run(self, block: Block) -> None:
        """Run one block; raise :class:`DocFailure` when it fails."""
        with self._here():
            if block.lang == "file":
                path = os.path.join(self.workdir, block.file)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(self._subst(block.code))
            elif block.lang in ("python", "setup"):
                self._python(block, self._subst(block.code))
            else:
                self._bash(block)

    def _python(self, block: Block, code: str, argv0: str = "<doc>") -> None:
        buf = io.StringIO()
        try:
            sys.modules[self.module.__name__] = self.module
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                # dont_inherit: this file's `from __future__ import annotations` must not apply
                exec(compile(code, block.where, "exec", dont_inherit=True), self.ns)  # noqa: S102
        except BaseException as e:  # also SystemExit
            if isinstance(e, SystemExit) and not e.code:
                return
            import traceback

            self._fail(block, f"python raised {type(e).__name__}: {e}",
                       buf.getvalue() + "".join(traceback.format_exception(e)[-6:]))

    def _bash(self, block: Block) -> None:
        code = self._subst(block.code)
        if "<<" in code:  # heredocs: the whole block in one shell
            self._shell(block, code)
            return
        for cmd in commands(code):
            self._command(block, cmd)

    def _command(self, block: Block, cmd: str) -> None:
        try:
            argv = shlex.split(cmd, comments=True)
        except ValueError:
            argv = []
        if argv and argv[0] == "export" and not _SHELL_CHARS.search(cmd.split("#")[0]):
            for kv in argv[1:]:
                k, _, v = kv.partition("=")
                self.env_changes.setdefault(k, os.environ.get(k))
                os.environ[k] = v
            return
        if argv and argv[0] in ("source", ".") and argv[1:] == [".venv/bin/activate"]:
            os.environ["PATH"] = self.bindir + os.pathsep + os.environ["PATH"]
            self.env_changes.setdefault("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])
            return
        if argv and _IN_PROCESS.match(cmd) and not _needs_shell(cmd, argv):
            prog = os.path.basename(argv[0])
            if prog == "jaxarith":
                return self._cli(block, cmd, "jaxarith", argv[1:])
            if argv[1:3] in (["-m", "jaxarith"], ["-m", "train"]):
                return self._cli(block, cmd, argv[2], argv[3:])
            if len(argv) == 3 and argv[1] == "-c":
                return self._python(block, argv[2])
        self._shell(block, cmd)

    def _cli(self, block: Block, cmd: str, prog: str, argv: list[str]) -> None:
        if prog == "train":
            from train.__main__ import main  # imported when a page runs it: tests load this early
        else:
            from jaxarith.cli import main  # (as above)
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        except BaseException as e:
            import traceback

            self._fail(block, f"`{cmd}` raised {type(e).__name__}: {e}",
                       buf.getvalue() + "".join(traceback.format_exception(e)[-6:]))
        if code:
            self._fail(block, f"`{cmd}` exited {code}", buf.getvalue())

    def _shell(self, block: Block, script: str) -> None:
        env = {**os.environ, "PATH": self.bindir + os.pathsep + os.environ.get("PATH", ""),
               "PYTHONPATH": self.repo + os.pathsep + os.environ.get("PYTHONPATH", "")}
        p = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=self.workdir,
                           env=env, capture_output=True, text=True, timeout=600)
        if p.returncode:
            self._fail(block, f"`{script.strip()}` exited {p.returncode}", p.stdout + p.stderr)


def document_blocks(repo: str) -> dict[str, list[Block]]:
    """Every documented runnable block of the repository: README.md, docs/*.md, configs/*.yaml.

    Returns:
      {relative path: blocks}, in a stable order.
    """
    out: dict[str, list[Block]] = {}
    docs = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(
        os.path.join(repo, "docs")) if f.endswith(".md"))
    for rel in docs:
        with open(os.path.join(repo, rel), encoding="utf-8") as f:
            out[rel] = extract_markdown(rel, f.read())
    for f in sorted(os.listdir(os.path.join(repo, "configs"))):
        if f.endswith((".yaml", ".yml")):
            rel = os.path.join("configs", f)
            blocks = extract_config(os.path.join(repo, rel))
            out[rel] = [dataclasses.replace(b, path=rel) for b in blocks]
    return out
