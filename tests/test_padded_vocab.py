"""Members with one tokenizer and embedding tables padded to different sizes (issue 29, item 5).

Three tiny Llamas share the bundled tokenizer (1024 tokens) and have 1024, 1040 and 1056 rows;
the padded rows of the expert and the anti-expert are made large, so that they would win (or
dominate the normalisation) if they took part. Proxy tuning, EFT decoding, lm-eval scoring and
distillation must equal a float64 numpy combination of transformers' logits over the tokenizer's
1024 rows.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxarith import testing
from jaxarith.decode.combine import proxy_tuning
from jaxarith.decode.loop import DecodeSpec, combine, generate
from jaxarith.distill.losses import DistillLoss
from jaxarith.errors import ConfigError
from jaxarith.io.convert import load_hf_params
from train import distill as TD

ROWS = testing.TINY_VOCAB  # the bundled tokenizer's tokens
SIZES = {"base": ROWS, "expert": ROWS + 16, "anti": ROWS + 32}
ALPHA = 0.7


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """{role: (directory, torch model)} with the padded rows of lm_head set large."""
    out = {}
    for seed, (role, v) in enumerate(SIZES.items()):
        d = tmp_path_factory.mktemp(role)
        model = testing.make_hf_model(d, testing.tiny_llama_config(vocab_size=v), seed=30 + seed)
        if v > ROWS:
            with torch.no_grad():
                w = model.lm_head.weight
                w[ROWS:] = 4.0 * w[:ROWS].abs().max() * torch.sign(w[:v - ROWS])
            model.save_pretrained(str(d))
        out[role] = (str(d), model)
    return out


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_proxy(logits):
    """float64 ``log_softmax(lp_base + alpha (lp_expert - lp_anti))`` over the tokenizer's rows."""
    lp = {r: _np_log_softmax(z[..., :ROWS]) for r, z in logits.items()}
    return _np_log_softmax(lp["base"] + ALPHA * (lp["expert"] - lp["anti"]))


def test_padded_rows_would_win(padded):
    """The fixture is what the module says: unmasked, the expert's padded rows win."""
    tokens = np.array([[5, 6, 7, 8, 9, 10]])
    z = testing.hf_logits(padded["expert"][1], tokens)
    assert (z.argmax(-1) >= ROWS).all()


def test_proxy_tuning_combines_over_the_tokenizers_rows(padded):
    loaded = {r: load_hf_params(d, progress=False) for r, (d, _) in padded.items()}
    cfgs = [loaded[r][0] for r in SIZES]
    members = proxy_tuning(*cfgs, alpha=ALPHA)
    dec = DecodeSpec(members=members, max_new_tokens=1, vocab_limit=ROWS)
    tokens, mask = np.random.RandomState(0).randint(3, ROWS, (3, 10)), np.ones((3, 10), int)
    mask[1, :4] = 0
    zs = [loaded[r][1] for r in SIZES]
    from jaxarith.models import forward

    ours = combine(dec, [forward(p, c, jnp.asarray(tokens), attention_mask=jnp.asarray(mask))[0]
                         for p, c in zip(zs, cfgs, strict=True)])
    assert ours.shape[-1] == ROWS
    ref = _np_proxy({r: testing.hf_logits(m, tokens, mask) for r, (_, m) in padded.items()})
    diff = np.abs(np.asarray(ours, np.float64) - ref)[mask.astype(bool)]
    assert diff.max() < 1e-4, diff.max()


def test_proxy_tuned_greedy_generation_equals_numpy(padded):
    """Greedy proxy tuning, token for token, against a float64 numpy loop over transformers."""
    loaded = {r: load_hf_params(d, progress=False) for r, (d, _) in padded.items()}
    members = proxy_tuning(*(loaded[r][0] for r in SIZES), alpha=ALPHA)
    dec = DecodeSpec(members=members, max_new_tokens=8, vocab_limit=ROWS)
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    gen = generate(dec, [loaded[r][1] for r in SIZES], prompts)
    for row, prompt in enumerate(prompts):
        seq, want, lps = list(prompt), [], []
        for _ in range(8):
            t = np.array([seq])
            lp = _np_proxy({r: testing.hf_logits(m, t) for r, (_, m) in padded.items()})[0, -1]
            nxt = int(lp.argmax())
            want.append(nxt)
            lps.append(lp[nxt])
            seq.append(nxt)
        assert max(want) < ROWS
        assert gen.tokens[row].tolist() == want
        np.testing.assert_allclose(gen.logprobs[row], lps, atol=1e-4)


def test_lmeval_proxy_loglikelihood_over_the_tokenizers_rows(padded):
    from jaxarith.eval.lmeval.lm import JaxarithLM

    lm = JaxarithLM(pretrained=padded["base"][0], expert=padded["expert"][0],
                    anti_expert=padded["anti"][0], alpha=ALPHA)
    assert lm.spec.vocab_limit == ROWS
    context, cont = [5, 6, 7, 8], [9, 10, 11]
    (got, greedy), = lm._loglikelihood_tokens([(("c", "x"), context, cont)], disable_tqdm=True)
    t = np.array([context + cont])
    lp = _np_proxy({r: testing.hf_logits(m, t) for r, (_, m) in padded.items()})[0]
    ref = sum(lp[len(context) - 1 + i, tok] for i, tok in enumerate(cont))
    assert abs(got - ref) < 1e-4, (got, ref)


def test_distillation_between_tables_padded_differently(padded):
    """Teacher (1040 rows) and student (1056 rows): forward KL at temperature 2 over the
    tokenizer's 1024 rows, against numpy."""
    (t_cfg, t_params), (s_cfg, s_params) = (load_hf_params(padded[r][0], progress=False)
                                            for r in ("expert", "anti"))
    opts = DistillLoss(temperature=2.0, alpha=1.0)
    with pytest.raises(ConfigError, match="give the tokenizer's size"):
        TD.check_vocab(s_cfg, t_cfg, "t")
    with pytest.raises(ConfigError, match="tokenizer has 1050 tokens but the teacher's "
                                          "embedding table has 1040 rows"):
        TD.check_vocab(s_cfg, t_cfg, "t", vocab_size=1050)
    TD.check_vocab(s_cfg, t_cfg, "t", vocab_size=ROWS)
    loss_fn = TD.make_loss_fn(s_cfg, opts, teacher_cfg=t_cfg, vocab_size=ROWS)
    tokens = np.random.RandomState(1).randint(3, ROWS, (2, 12))
    loss, count, _ = jax.jit(loss_fn)(s_params, {TD.NAME: t_params},
                                      {"tokens": jnp.asarray(tokens)})
    zt = testing.hf_logits(padded["expert"][1], tokens)[:, :-1, :ROWS] / 2.0
    zs = testing.hf_logits(padded["anti"][1], tokens)[:, :-1, :ROWS] / 2.0
    lpt, lps = _np_log_softmax(zt), _np_log_softmax(zs)
    kl = (np.exp(lpt) * (lpt - lps)).sum(-1) * 4.0  # scaled by tau^2
    assert abs(float(loss) / float(count) - kl.mean()) < 1e-4


def test_different_tokenizers_stay_an_error_naming_the_token(padded):
    from jaxarith.io.vocab import shared_tokenizer

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    a = Tok({"a": 0, "b": 1, "c": 2})
    b = Tok({"a": 0, "c": 1, "b": 2})
    with pytest.raises(ConfigError, match="at id 1: 'b' vs 'c'"):
        shared_tokenizer(["x", "y"], [a, b])


# ------------------------------------------------------------- arithmetic: --align-vocab


def _tensors(d):
    from jaxarith.io.convert.hf import HFCheckpoint

    ck = HFCheckpoint(d)
    return {k: ck.get(k).astype(np.float64) for k in ck.keys()}


VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")


def test_delta_between_padded_tables_is_refused_unless_aligned(padded, tmp_path, capsys):
    import json

    from jaxarith.cli import main

    base, expert = padded["base"][0], padded["expert"][0]
    assert main(["delta", "extract", expert, base, str(tmp_path / "no"), "--json"]) == 2
    err = json.loads(capsys.readouterr().out)["error"]
    assert "vocabulary sizes" in err and "--align-vocab" in err
    assert not (tmp_path / "no").exists()
    t, b = _tensors(expert), _tensors(base)
    for flags in ([], ["--in-memory"]):
        out = tmp_path / f"d{len(flags)}"
        assert main(["delta", "extract", expert, base, str(out), "--align-vocab", "--json",
                     *flags]) == 0
        capsys.readouterr()
        got = _tensors(str(out))
        assert json.load(open(out / "config.json"))["vocab_size"] == ROWS
        for k, v in got.items():
            want = t[k][:ROWS] - b[k] if k in VOCAB_KEYS else t[k] - b[k]
            np.testing.assert_allclose(v, want, atol=1e-6, err_msg=k)


def test_aligned_rows_a_model_lacks_are_the_bases(padded, tmp_path, capsys):
    """TUNED with 1024 rows, BASE with 1056: the delta's 32 extra rows are 0 (the base's)."""
    from jaxarith.cli import main

    tuned, base = padded["base"][0], padded["anti"][0]
    assert main(["delta", "extract", tuned, base, str(tmp_path / "d"), "--align-vocab",
                 "--json"]) == 0
    got, t, b = _tensors(str(tmp_path / "d")), _tensors(tuned), _tensors(base)
    for k in VOCAB_KEYS:
        assert got[k].shape[0] == SIZES["anti"]
        np.testing.assert_allclose(got[k][:ROWS], t[k] - b[k][:ROWS], atol=1e-6)
        assert (got[k][ROWS:] == 0).all()


def test_aligned_task_arithmetic_merge_against_numpy(padded, tmp_path, capsys):
    from jaxarith.cli import main

    base, e, a = (padded[r][0] for r in SIZES)
    (tmp_path / "m.yaml").write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
        f"  - model: {e}\n    parameters: {{weight: 0.6}}\n"
        f"  - model: {a}\n    parameters: {{weight: 0.3}}\ndtype: float32\n")
    assert main(["merge", str(tmp_path / "m.yaml"), str(tmp_path / "o"), "--align-vocab",
                 "--json"]) == 0
    got, tb, te, ta = (_tensors(d) for d in (str(tmp_path / "o"), base, e, a))
    for k, v in got.items():
        cut = (lambda x: x[:ROWS]) if k in VOCAB_KEYS else (lambda x: x)
        want = tb[k] + 0.6 * (cut(te[k]) - tb[k]) + 0.3 * (cut(ta[k]) - tb[k])
        np.testing.assert_allclose(v, want, atol=1e-6, err_msg=k)


def test_align_vocab_still_refuses_other_differences(padded, tmp_path):
    import shutil

    from jaxarith import arith
    from jaxarith.arith.select import MergeSpec
    from jaxarith.errors import ArchitectureMismatchError

    wide = tmp_path / "wide"
    testing.make_hf_model(wide, testing.tiny_llama_config(vocab_size=ROWS + 16,
                                                          intermediate_size=96))
    spec = MergeSpec(method=arith.method("delta"))
    with pytest.raises(ArchitectureMismatchError, match="more than its vocabulary size"):
        arith.run_streamed(spec, [str(wide), padded["base"][0]], tmp_path / "o",
                           progress=False, align_to=1)
    other = tmp_path / "other_tok"  # the expert's weights with two tokens swapped
    shutil.copytree(padded["expert"][0], other)
    import json

    spec_json = json.load(open(other / "tokenizer.json"))
    vocab = spec_json["model"]["vocab"]
    x, y = sorted(vocab, key=vocab.get)[200:202]
    vocab[x], vocab[y] = vocab[y], vocab[x]
    json.dump(spec_json, open(other / "tokenizer.json", "w"))
    with pytest.raises(ConfigError, match="at id 200"):
        arith.run_streamed(spec, [str(other), padded["base"][0]], tmp_path / "o2",
                           progress=False, align_to=1)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
