"""Bad input to the CLI: one clear line and a non-zero exit (``{"error": ...}`` under --json)."""

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from jaxarith.cli import main
from jaxarith.commands import _common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _one_error_line(capsys, code, expected_code, *, json_mode, match) -> str:
    out, err = capsys.readouterr()
    assert code == expected_code
    assert "Traceback" not in err
    if json_mode:
        res = json.loads(out)  # exactly one JSON object
        assert set(res) == {"error", "type"} and match in res["error"], res
        return res["error"]
    assert out == "" and err.count("\n") == 1 and match in err, err
    return err


@pytest.fixture
def bad_texts(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return {"latin1": str(latin1), "dir": str(tmp_path)}


@pytest.mark.parametrize("json_mode", [False, True])
@pytest.mark.parametrize("argv,match", [
    (["--text", "{latin1}"], "not UTF-8"),
    (["--text", "{dir}"], "is a directory"),
    (["--text", "{latin1}", "--batch-size", "0"], "--batch-size 0"),
    (["--text", "{latin1}", "--seq-len", "1"], "--seq-len 1"),
])
def test_eval_loss_bad_input(gpt2_dir, bad_texts, capsys, argv, match, json_mode):
    argv = [a.format(**bad_texts) for a in argv]
    code = main(["eval-loss", gpt2_dir[0], *argv] + (["--json"] if json_mode else []))
    _one_error_line(capsys, code, 2, json_mode=json_mode, match=match)


def test_seq_len_above_the_context_warns(gpt2_dir, tmp_path, capsys):
    from jaxarith.models import load_config

    ctx = load_config(gpt2_dir[0]).context_length
    text = tmp_path / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40)
    assert main(["eval-loss", gpt2_dir[0], "--text", str(text), "--seq-len", str(ctx + 100),
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["tokens"] > 0
    assert f"--seq-len {ctx + 100} exceeds the model's context length {ctx}" in err


@pytest.mark.parametrize("json_mode", [False, True])
@pytest.mark.parametrize("exc,code,match", [
    (KeyboardInterrupt, 130, "interrupted (Ctrl-C)"),
    (ValueError("coordinator_address should be defined."), 2, "distributed=false"),
])
def test_interrupt_and_pod_config_on_a_laptop(capsys, exc, code, match, json_mode):
    def handler(args):
        raise exc

    args = types.SimpleNamespace(handler=handler, command="train", json=json_mode)
    _one_error_line(capsys, _common.run(args), code, json_mode=json_mode, match=match)


def test_other_value_errors_still_show_a_traceback():
    """Only known conditions are turned into one line: a bug must stay visible."""
    def handler(args):
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        _common.run(types.SimpleNamespace(handler=handler, command="x", json=False))


def test_pod_config_on_a_laptop_end_to_end(tmp_path):
    """A fresh process (jax.distributed must come before any other JAX call)."""
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.run([sys.executable, "-m", "train",
                        os.path.join(REPO, "configs/llama3_2_1b_cpt_pod.yaml"),
                        f"out={tmp_path / 'run'}"], env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "distributed: true" in p.stderr
    assert "needs a multi-host cluster" in p.stderr
    assert not (tmp_path / "run").exists()


def test_broken_pipe_is_one_line(tmp_path):
    """``jaxarith inspect X | head``: the reader goes away while we still print."""
    script = textwrap.dedent("""
        import sys, types
        from jaxarith.commands import _common

        def handler(args):
            for i in range(200_000):
                print(f"tensor {i}")
            return 0

        sys.exit(_common.run(types.SimpleNamespace(handler=handler, command="inspect",
                                                   json=False)))
    """)
    env = {**os.environ, "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "tensor 0\n"
    p.stdout.close()
    err = p.stderr.read()
    assert p.wait(timeout=30) == 141
    assert err == "jaxarith inspect: output closed before the end (broken pipe)\n"


def test_mistyped_local_path_says_no_directory_either(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub cannot be reached
    code = main(["inspect", "runs/my-model", "--json"])
    msg = _one_error_line(capsys, code, 2, json_mode=True, match="Hugging Face hub")
    assert f"no local directory {tmp_path / 'runs/my-model'}" in msg


def test_generate_prompt_file_not_utf8(gpt2_dir, bad_texts, capsys):
    code = main(["generate", gpt2_dir[0], "--prompt-file", bad_texts["latin1"], "--json"])
    _one_error_line(capsys, code, 2, json_mode=True, match="--prompt-file")
