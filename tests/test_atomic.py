"""Safe outputs: --overwrite never destroys what jaxarith did not write; temps are cleaned up."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from jaxarith.cli import main
from jaxarith.io import atomic
from jaxarith.io.atomic import MARKER, OutputExistsError, UnsafeDestinationError, atomic_dir
from jaxarith.io.convert.route import convert


def _tree(path) -> dict:
    """Every file below ``path`` with its bytes (what a data-loss test compares)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


def _hidden(parent) -> list[str]:
    return sorted(p for p in os.listdir(parent) if ".tmp-" in p or ".old-" in p)


@pytest.fixture
def user_dir(tmp_path):
    """A directory of someone's files that jaxarith did not write."""
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\0\1\2")
    return d


def test_overwrite_refuses_the_current_directory(gpt2_dir, tmp_path, monkeypatch, capsys):
    # before the fix this deleted every file in the current directory
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    code = main(["convert", gpt2_dir[0], ".", "--overwrite"])
    assert code == 2
    err = capsys.readouterr().err
    assert "current directory" in err and err.count("\n") == 1
    assert _tree(work) == {"thesis.tex": b"years of work"}


def test_overwrite_refuses_a_parent_of_the_source(gpt2_dir, tmp_path, capsys):
    # before the fix, writing to the source's parent with --overwrite deleted the source
    parent = tmp_path / "models"
    src = parent / "gpt2"
    convert(gpt2_dir[0], src, to="hf", progress=False)  # a marked output inside `parent`
    atomic.write_marker(parent)  # even a jaxarith output may not be replaced if it holds an input
    before = _tree(parent)
    assert main(["convert", str(src), str(parent), "--overwrite", "--to", "hf", "--json"]) == 2
    res = json.loads(capsys.readouterr().out)
    assert "holds an input" in res["error"] and res["type"] == "UnsafeDestinationError"
    assert _tree(parent) == before


def test_overwrite_refuses_the_input_itself(gpt2_dir, tmp_path):
    src = tmp_path / "model"
    convert(gpt2_dir[0], src, to="hf", progress=False)
    before = _tree(src)
    with pytest.raises(UnsafeDestinationError, match="is an input"):
        convert(str(src), src, to="hf", overwrite=True, progress=False)
    assert _tree(src) == before


def test_overwrite_refuses_unmarked_home_and_root(user_dir, tmp_path, monkeypatch):
    before = _tree(user_dir)
    with pytest.raises(UnsafeDestinationError, match="not written by jaxarith"):
        atomic.check_destination(user_dir, overwrite=True)
    with pytest.raises(UnsafeDestinationError, match="not written by jaxarith"):
        with atomic_dir(user_dir, overwrite=True):
            raise AssertionError("must not be reached")
    assert _tree(user_dir) == before
    monkeypatch.setenv("HOME", str(user_dir))
    atomic.write_marker(user_dir)  # even marked, $HOME is never replaced
    with pytest.raises(UnsafeDestinationError, match="home directory"):
        atomic.check_destination(user_dir, overwrite=True)
    with pytest.raises(UnsafeDestinationError, match="root directory|current directory|home"):
        atomic.check_destination("/", overwrite=True)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UnsafeDestinationError, match="not a directory"):
        atomic.check_destination(tmp_path / "a_file", overwrite=True)


def test_without_overwrite_says_whether_overwrite_would_help(user_dir, tmp_path):
    with pytest.raises(UnsafeDestinationError, match="not written by jaxarith"):
        atomic.check_destination(user_dir)
    marked = tmp_path / "marked"
    with atomic_dir(marked):
        pass
    with pytest.raises(OutputExistsError, match="pass --overwrite"):
        atomic.check_destination(marked)


def test_overwrite_replaces_marked_and_empty_directories(gpt2_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    convert(gpt2_dir[0], empty, to="hf", overwrite=True, progress=False)
    marker = json.loads((empty / MARKER).read_text())
    assert marker["written_by"].startswith("jaxarith") and marker["pid"] == os.getpid()
    (empty / "stale.txt").write_text("from the previous output")
    convert(gpt2_dir[0], empty, to="hf", overwrite=True, progress=False)
    assert not (empty / "stale.txt").exists() and (empty / "config.json").exists()
    assert _hidden(tmp_path) == []


def test_failed_replacement_keeps_the_old_output(tmp_path):
    dst = tmp_path / "out"
    with atomic_dir(dst) as tmp:
        open(os.path.join(tmp, "a"), "w").write("old")
    with pytest.raises(RuntimeError), atomic_dir(dst, overwrite=True) as tmp:
        open(os.path.join(tmp, "a"), "w").write("new, half written")
        raise RuntimeError("disk full")
    assert (dst / "a").read_text() == "old" and _hidden(tmp_path) == []


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as tmp:
            assert ".tmp-" in os.path.basename(tmp)
        # mkdtemp gave 0700 before the fix
        assert (os.stat(tmp_path / "out").st_mode & 0o777) == 0o755
        os.umask(0o077)
        with atomic_dir(tmp_path / "private"):
            pass
        assert (os.stat(tmp_path / "private").st_mode & 0o777) == 0o700
    finally:
        os.umask(old)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temps_of_dead_processes_are_removed(tmp_path, capsys):
    host = atomic._hostname()
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".out.tmp-{host}-{dead}-0123abcd"
    running = tmp_path / f".out.tmp-{host}-{alive}-0123abcd"
    other_host = tmp_path / f".out.tmp-elsewhere-{dead}-0123abcd"
    other_name = tmp_path / f".other.tmp-{host}-{dead}-0123abcd"
    for d in (stale, running, other_host, other_name):
        d.mkdir()
        (d / "shard.safetensors").write_bytes(b"\0" * 1000)
    with atomic_dir(tmp_path / "out"):
        pass
    assert not stale.exists()
    assert running.exists() and other_host.exists() and other_name.exists()
    err = capsys.readouterr().err
    assert f"removed {stale}" in err and str(dead) in err
    assert socket.gethostname() and host in stale.name


def test_interrupted_old_output_is_reported_not_deleted(tmp_path, capsys):
    old = tmp_path / f".out.old-{atomic._hostname()}-{_dead_pid()}-0123abcd"
    old.mkdir()
    (old / "weights").write_text("the previous output")
    assert atomic.clean_stale(tmp_path / "out") == []
    assert old.exists() and "rename it back" in capsys.readouterr().err


_SLOW_WRITER = textwrap.dedent("""
    import os, sys, time, types
    from jaxarith.io.atomic import atomic_dir
    from jaxarith.commands import _common

    def handler(args):
        with atomic_dir(sys.argv[1]) as tmp:
            with open(os.path.join(tmp, "shard"), "wb") as f:
                f.write(b"0" * 1_000_000)
            print("writing", flush=True)
            time.sleep(60)
        return 0

    sys.exit(_common.run(types.SimpleNamespace(handler=handler, command="convert", json=False)))
""")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_a_write_removes_the_temp(tmp_path, sig, code):
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(tmp_path / "out")], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "writing\n"
    assert len(_hidden(tmp_path)) == 1
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == code
    assert err.count("\n") == 1 and "Traceback" not in err and "removed" in err, err
    assert os.listdir(tmp_path) == []


def test_claim_dir_reuses_marked_and_refuses_foreign_directories(user_dir, tmp_path):
    run = atomic.claim_dir(tmp_path / "run", kind="training run")
    assert atomic.is_output(run)
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    assert atomic.claim_dir(run, kind="training run") == run  # resume
    with pytest.raises(UnsafeDestinationError, match="not written by jaxarith"):
        atomic.claim_dir(user_dir, kind="training run")
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    atomic.claim_dir(legacy, kind="training run", accept=("checkpoints",))
    assert atomic.is_output(legacy)
    fresh = atomic.replace_dir(run, kind="training run")
    assert os.listdir(fresh) == [MARKER]
    with pytest.raises(UnsafeDestinationError):
        atomic.replace_dir(user_dir, kind="experiment")
    assert (user_dir / "notes.txt").read_text() == "keep me"
