"""jaxarith's merges against mergekit 0.1.5's own output, tensor by tensor.

The checkpoints are tiny float32 Llamas whose values are dyadic (multiples of 2^-6), so every
task vector ``model - base`` is exact in float32 and its magnitudes take five levels: lots of
ties. The level counts are laid out so that ``k = int(density * n)`` ends exactly at a level
boundary for the densities used (0.3, 0.5, 0.7): the top-k set is then unique however ties are
broken, and TIES must agree with mergekit entry for entry. Where k falls inside a tie group
(``test_ties_tie_at_threshold``), mergekit picks among the tied entries with torch's *unstable*
``argsort`` (its order is an implementation detail, not the position), so that test checks what
both must share: exactly k kept, the same entries above the threshold, as many at it; and checks
jaxarith's choice (first in HF order) against a numpy reference.

mergekit runs in this process through its Python API (``run_merge``), all merges once per module.
"""

import json

import numpy as np
import pytest
import yaml

from jaxarith import testing
from jaxarith.cli import main
from jaxarith.io.convert.hf import HFCheckpoint
from jaxarith.io.convert.safetensors_io import write_safetensors

mergekit = pytest.importorskip("mergekit", reason="mergekit==0.1.5 (the `test` extra) is not "
                                                  "installed: no parity check against it")

LEVELS = (0.3, 0.5, 0.7, 0.85)  # k boundaries: level 5 above 0.3, 4 up to 0.5, ...
Q = 2.0 ** -6


def _quantised_delta(rng, n, levels=LEVELS):
    """Magnitudes len(levels)+1, ..., 2, 1 (x 2^-6) by rank, so ``int(d * n)`` (Python floats,
    as mergekit counts) for d in ``levels`` is a boundary."""
    ks = [int(d * n) for d in levels]
    level = np.ones(n)
    rank = rng.permutation(n)
    for lv, k in zip(range(len(levels) + 1, 1, -1), ks, strict=True):
        level[(rank < k) & (level == 1)] = lv
    return (level * Q * rng.choice([-1.0, 1.0], n)).astype(np.float32)


def _write_like(template, directory, tensors):
    """An HF directory with ``template``'s config/tokenizer and these float32 tensors."""
    import shutil

    shutil.copytree(template, directory, ignore=shutil.ignore_patterns("*.safetensors*"))
    specs = [(k, v.shape, v.dtype) for k, v in tensors.items()]
    write_safetensors(f"{directory}/model.safetensors", specs, list(tensors.values()))


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """{"B": base, "M1", "M2": base + quantised task vectors} as float32 HF directories, and
    "R0", "R1": float32 Llamas with random weights (not representable in bfloat16)."""
    d = tmp_path_factory.mktemp("mk_family")
    testing.make_hf_model(d / "template", testing.tiny_llama_config(), seed=0)
    names = HFCheckpoint(str(d / "template"))
    rng = np.random.default_rng(0)
    shapes = {k: names.shape(k) for k in names.keys()}
    base = {k: (rng.integers(-32, 33, s) * Q).astype(np.float32) for k, s in shapes.items()}
    out = {"B": str(d / "B"), "R0": str(d / "template")}
    testing.make_hf_model(d / "R1", testing.tiny_llama_config(), seed=1)
    out["R1"] = str(d / "R1")
    _write_like(d / "template", out["B"], base)
    for m in ("M1", "M2"):
        tensors = {k: base[k] + _quantised_delta(rng, int(np.prod(s))).reshape(s)
                   for k, s in shapes.items()}
        out[m] = str(d / m)
        _write_like(d / "template", out[m], tensors)
    return out


CONFIGS = {
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {B}
models:
  - model: {M1}
    parameters: {{weight: 0.7}}
  - model: {M2}
    parameters: {{weight: [0.2, 0.9]}}
parameters: {{lambda: 0.8}}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: {B}
models:
  - model: {M1}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {M2}
    parameters:
      weight: [0.5, 1.0]
      density: [{{filter: self_attn, value: 0.3}}, {{value: [0.7, 0.5]}}]
dtype: float32
""",
    "ties_unnormalized": """
merge_method: ties
base_model: {B}
models:
  - model: {M1}
    parameters: {{weight: 0.6, density: 0.7}}
  - model: {M2}
    parameters: {{weight: 0.3, density: 0.3}}
parameters: {{normalize: false, lambda: 0.5}}
dtype: float32
""",
    "slerp": """
slices:
  - sources:
      - model: {B}
        layer_range: [0, 2]
      - model: {M1}
        layer_range: [0, 2]
merge_method: slerp
base_model: {B}
parameters:
  t:
    - filter: self_attn
      value: [0.2, 0.8]
    - filter: mlp
      value: [0.9, 0.1]
    - value: 0.3
dtype: float32
""",
    "linear": """
merge_method: linear
models:
  - model: {B}
    parameters: {{weight: 0.2}}
  - model: {M1}
    parameters: {{weight: [0.3, 0.6]}}
  - model: {M2}
    parameters: {{weight: 0.5}}
dtype: float32
""",
    "linear_bf16_inputs": """
merge_method: linear
models:
  - model: {R0}
    parameters: {{weight: 0.25}}
  - model: {R1}
    parameters: {{weight: 0.35}}
dtype: bfloat16
out_dtype: float32
""",
    "slerp_random": """
merge_method: slerp
base_model: {R0}
models:
  - model: {R0}
  - model: {R1}
parameters: {{t: [0.1, 0.6]}}
""",
}
# mergekit loads a task vector as one tensor per HF name; SLERP's per-row angle and the linear
# sum are float32 in both (summation order may differ by an ulp); TIES and task arithmetic on
# exact task vectors with a unique top-k set differ only by rounding of the weighted sums.
ATOL = {"task_arithmetic": 1e-6, "ties": 1e-6, "ties_unnormalized": 1e-6, "slerp": 1e-6,
        "linear": 1e-6, "linear_bf16_inputs": 1e-6, "slerp_random": 1e-6}


def _run_mergekit(text, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(cfg, str(out), options=MergeOptions(quiet=True, copy_tokenizer=False,
                                                   write_model_card=False))


@pytest.fixture(scope="module")
def merged(family, tmp_path_factory):
    """{name: (mergekit's output dir, jaxarith's output dir)}, every config run by both."""
    d = tmp_path_factory.mktemp("mk_out")
    out = {}
    for name, text in CONFIGS.items():
        text = text.format(**family)
        (d / f"{name}.yaml").write_text(text)
        _run_mergekit(text, d / f"{name}_mk")
        assert main(["merge", str(d / f"{name}.yaml"), str(d / f"{name}_jx"), "--json"]) == 0
        out[name] = (str(d / f"{name}_mk"), str(d / f"{name}_jx"))
    return out


def _tensors(directory):
    ckpt = HFCheckpoint(directory)
    return {k: ckpt.get(k) for k in ckpt.keys()}


# Results rounded to bfloat16 (``dtype: bfloat16``): sums of bfloat16 inputs often land exactly
# half-way between two bfloat16 numbers; float32 summation order (FMA or not) then decides the
# rounding, so ~1% of entries differ by one bfloat16 ulp (never more).
BF16_RESULT = {"linear_bf16_inputs"}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_mergekit(merged, name, capsys):
    mk, jx = (_tensors(p) for p in merged[name])
    capsys.readouterr()
    assert set(mk) == set(jx)
    worst, off, total = 0.0, 0, 0
    for k in mk:
        assert jx[k].dtype == mk[k].dtype == np.float32, k
        diff = np.abs(jx[k].astype(np.float64) - mk[k])
        worst = max(worst, float(diff.max()))
        total += diff.size
        if name in BF16_RESULT:
            off += int((diff > 0).sum())
            big = np.maximum(np.abs(mk[k]), np.abs(jx[k])).astype(np.float64)
            ulp = 2.0 ** (np.floor(np.log2(np.where(big > 0, big, 1.0))) - 7)  # bf16 spacing
            assert np.all(diff <= ulp + 1e-9), k  # 1e-9: float32 cancellation near 0
        else:
            assert diff.max() <= ATOL[name], f"{name}: {k}: max |diff| = {diff.max():.3g}"
    assert off <= 0.03 * total
    with capsys.disabled():
        print(f"\n{name}: max |jaxarith - mergekit| = {worst:.3g} ({off} of {total} entries "
              "one bf16 ulp apart)" if name in BF16_RESULT else
              f"\n{name}: max |jaxarith - mergekit| = {worst:.3g}")


def test_parity_inputs_have_ties_and_nontrivial_results(family, merged):
    """The fixture is what the module doc says: ties everywhere, and merges that change things."""
    b, m1 = _tensors(family["B"]), _tensors(family["M1"])
    tau = np.abs(m1["model.layers.0.mlp.up_proj.weight"] - b["model.layers.0.mlp.up_proj.weight"])
    assert len(np.unique(tau)) == 5
    ties = _tensors(merged["ties"][1])
    for k in b:
        assert not np.array_equal(ties[k], b[k]), k


def _np_trim_first_in_order(x, density):
    """Keep exactly k = max(1, int(density * n)) largest |x|, ties by row-major position."""
    flat = x.reshape(-1)
    k = max(1, int(density * flat.size))
    order = np.argsort(-np.abs(flat), kind="stable")[:k]
    keep = np.zeros(flat.size, bool)
    keep[order] = True
    return np.where(keep.reshape(x.shape), x, 0)


def test_ties_tie_at_threshold(family, tmp_path, capsys):
    """k inside a tie group: both keep exactly k; above the threshold the same entries."""
    text = f"""
merge_method: ties
base_model: {family['B']}
models:
  - model: {family['M1']}
    parameters: {{weight: 1.0, density: 0.4}}
dtype: float32
"""
    (tmp_path / "t.yaml").write_text(text)
    _run_mergekit(text, tmp_path / "mk")
    assert main(["merge", str(tmp_path / "t.yaml"), str(tmp_path / "jx"), "--json"]) == 0
    assert "error" not in json.loads(capsys.readouterr().out)
    b, m1 = _tensors(family["B"]), _tensors(family["M1"])
    mk, jx = _tensors(str(tmp_path / "mk")), _tensors(str(tmp_path / "jx"))
    differ = 0
    for k in b:
        tau = m1[k] - b[k]
        n = tau.size
        kk = max(1, int(0.4 * n))
        thr = np.sort(np.abs(tau).reshape(-1))[n - kk]
        kept_mk, kept_jx = mk[k] != b[k], jx[k] != b[k]
        assert kept_mk.sum() == kept_jx.sum() == kk, k
        above = np.abs(tau) > thr
        assert np.array_equal(kept_mk & above, above) and np.array_equal(kept_jx & above, above)
        # jaxarith: the first tied entries in HF row-major order (a numpy reference)
        np.testing.assert_array_equal(jx[k] - b[k], _np_trim_first_in_order(tau, 0.4), k)
        differ += int((kept_mk != kept_jx).sum())
    # mergekit's unstable argsort picks other tied entries: a documented difference
    assert differ > 0


# ------------------------------------------------- keep counts where float32 densities round down

DECIMAL_LEVELS = (0.3, 0.7, 0.9)


def decimal_llama_config():
    """A tiny Llama whose tensor sizes are multiples of 10 (hidden 80, MLP 120, 3 layers), where
    ``int(float32(d) * n)`` is one below ``int(d * n)`` for d = 0.7 and 0.9 (never for 0.3)."""
    return testing.tiny_llama_config(hidden_size=80, intermediate_size=120, num_attention_heads=5,
                                     num_key_value_heads=1, head_dim=16, num_hidden_layers=3)


@pytest.fixture(scope="module")
def decimal_family(tmp_path_factory):
    """{"B", "M1", "M2", "M3"}: a base and three models whose task vectors have magnitude
    levels bounded at ``int(d * n)`` for d in 0.3, 0.7, 0.9 (the top-k sets are unique)."""
    d = tmp_path_factory.mktemp("mk_decimal")
    testing.make_hf_model(d / "template", decimal_llama_config(), seed=0)
    names = HFCheckpoint(str(d / "template"))
    rng = np.random.default_rng(1)
    shapes = {k: names.shape(k) for k in names.keys()}
    base = {k: (rng.integers(-32, 33, s) * Q).astype(np.float32) for k, s in shapes.items()}
    out = {"B": str(d / "B")}
    _write_like(d / "template", out["B"], base)
    for m in ("M1", "M2", "M3"):
        tensors = {k: base[k] + _quantised_delta(rng, int(np.prod(s)), DECIMAL_LEVELS).reshape(s)
                   for k, s in shapes.items()}
        out[m] = str(d / m)
        _write_like(d / "template", out[m], tensors)
    return out


DECIMAL_CONFIGS = {
    # one model each: the result is base + the trimmed task vector, so one entry kept fewer
    # shows as a whole magnitude level (>= 2^-6) in that entry
    "d07": "merge_method: ties\nbase_model: {B}\nmodels:\n  - model: {M1}\n"
           "    parameters: {{weight: 1.0, density: 0.7}}\ndtype: float32\n",
    "d09": "merge_method: ties\nbase_model: {B}\nmodels:\n  - model: {M1}\n"
           "    parameters: {{weight: 1.0, density: 0.9}}\ndtype: float32\n",
    "d03": "merge_method: ties\nbase_model: {B}\nmodels:\n  - model: {M1}\n"
           "    parameters: {{weight: 1.0, density: 0.3}}\ndtype: float32\n",
    # three models, per-layer densities and filters
    "three": """
merge_method: ties
base_model: {B}
models:
  - model: {M1}
    parameters: {{weight: 1.0, density: 0.7}}
  - model: {M2}
    parameters:
      weight: 0.5
      density: [{{filter: layers, value: [0.9, 0.7, 0.9]}}, {{value: 0.9}}]
  - model: {M3}
    parameters:
      weight: 0.8
      density: [{{filter: mlp, value: 0.3}}, {{value: 0.7}}]
parameters: {{lambda: 0.9}}
dtype: float32
""",
    # a schedule interpolated over 3 layers: 0.3, 0.5 * 0.5 + 0.5 * 0.9 (== 0.7), 0.9
    "interpolated": """
merge_method: ties
base_model: {B}
models:
  - model: {M1}
    parameters:
      weight: 1.0
      density: [{{filter: layers, value: [0.3, 0.5, 0.9, 0.9]}}, {{value: 0.7}}]
dtype: float32
""",
}


def test_keep_count_hand_table():
    """The count mergekit keeps, from the YAML's number (Python float), by a hand table."""
    from jaxarith.arith import ops
    from jaxarith.arith.methods import method
    from jaxarith.arith.select import MergeSpec

    table = [(0.7, 30720, 21504), (0.9, 30720, 27648), (0.3, 30720, 9216), (0.7, 9600, 6720),
             (0.9, 9600, 8640), (0.7, 10, 7), (0.9, 80, 72), (0.3, 80, 24), (0.5, 4096, 2048),
             (0.7, 64, 44), (0.001, 100, 1), (0.0, 100, 0), (1.0, 100, 100), (1.5, 100, 100)]
    for d, n, k in table:
        assert ops.keep_count(d, n) == k, (d, n)
    # through the parameter resolution both executors use: constants and a depth schedule
    spec = MergeSpec(method=method("ties"), per_model=(
        {"density": 0.7}, {"density": 0.9}, {"density": 0.3}, {"density": [0.5, 0.9]}))
    for layer, k_last in ((0, 15360), (1, 21504), (2, 27648)):
        p, _ = spec.tensor_params(("layers/mlp/up", "model.layers.0.mlp.up_proj.weight"), layer,
                                  3, 30720, 5)
        assert p["k"].tolist() == [21504, 27648, 9216, k_last], layer


@pytest.fixture(scope="module")
def decimal_merged(decimal_family, tmp_path_factory):
    """{name: (mergekit's dir, jaxarith streamed dir, jaxarith in-memory dir)}."""
    d = tmp_path_factory.mktemp("mk_decimal_out")
    out = {}
    for name, text in DECIMAL_CONFIGS.items():
        text = text.format(**decimal_family)
        (d / f"{name}.yaml").write_text(text)
        _run_mergekit(text, d / f"{name}_mk")
        assert main(["merge", str(d / f"{name}.yaml"), str(d / f"{name}_jx"), "--json"]) == 0
        assert main(["merge", str(d / f"{name}.yaml"), str(d / f"{name}_mem"), "--in-memory",
                     "--json"]) == 0
        out[name] = tuple(str(d / f"{name}_{s}") for s in ("mk", "jx", "mem"))
    return out


@pytest.mark.parametrize("name", list(DECIMAL_CONFIGS))
def test_ties_keep_count_matches_mergekit(decimal_family, decimal_merged, name, capsys):
    """Densities 0.7 and 0.9 on tensors of 80 x 120, 80 x 80, ...: float32 densities would keep
    one entry fewer per tensor than mergekit (a whole magnitude level off)."""
    mk, jx, mem = (_tensors(p) for p in decimal_merged[name])
    capsys.readouterr()
    assert set(mk) == set(jx) == set(mem)
    worst = 0.0
    for k in mk:
        for got in (jx[k], mem[k]):
            diff = float(np.abs(got.astype(np.float64) - mk[k]).max())
            worst = max(worst, diff)
            assert diff <= 1e-5, f"{name}: {k}: max |diff| = {diff:.3g}"
    if name in ("d07", "d09", "d03"):  # exactly int(d * n) task-vector entries kept
        dens = float(name[1:]) / 10
        b = _tensors(decimal_family["B"])
        for k in b:
            assert int((jx[k] != b[k]).sum()) == max(1, int(dens * b[k].size)), k
    with capsys.disabled():
        print(f"\n{name}: max |jaxarith - mergekit| = {worst:.3g}")


# ------------------------------------------------------------------------------- chat_template

LITERAL_TEMPLATE = ("{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
                    "{% if add_generation_prompt %}<<assistant>> {% endif %}")


def _with_template(src, dst, template):
    """A copy of the model ``src`` whose tokenizer carries ``template`` (None: none)."""
    import shutil

    import transformers

    shutil.copytree(src, dst)
    if template is not None:
        tok = transformers.AutoTokenizer.from_pretrained(dst)
        tok.chat_template = template
        tok.save_pretrained(dst)
    return str(dst)


@pytest.fixture(scope="module")
def templated(family, tmp_path_factory):
    """B carries llama3's template, M1 and M2 chatml's (so ``auto`` must pick chatml), M3 none."""
    from jaxarith.arith.chat_templates import TEMPLATES

    d = tmp_path_factory.mktemp("mk_templated")
    return {"B": _with_template(family["B"], d / "B", TEMPLATES["llama3"]),
            "M1": _with_template(family["M1"], d / "M1", TEMPLATES["chatml"]),
            "M2": _with_template(family["M2"], d / "M2", "\n" + TEMPLATES["chatml"] + "  \n"),
            "M3": _with_template(family["R1"], d / "M3", None)}


def _run_mergekit_with_tokenizer(text, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate(yaml.safe_load(text))
    run_merge(cfg, str(out), options=MergeOptions(quiet=True, write_model_card=False))


CHAT_CONFIGS = {
    "chatml": ("chat_template: chatml", "B", "M3"),
    "llama3_over_chatml": ("chat_template: llama3", "M1", "M3"),
    "literal": ("chat_template: " + json.dumps(LITERAL_TEMPLATE), "M3", "B"),
    "auto": ("chat_template: auto", "B", "M1", "M2", "M3"),
}


@pytest.mark.parametrize("name", list(CHAT_CONFIGS))
@pytest.mark.parametrize("executor", ["streamed", "in_memory"])
def test_chat_template_matches_mergekit(templated, tmp_path, name, executor, capsys):
    """The output's tokenizer carries the template mergekit writes, in the same files."""
    import transformers

    from jaxarith.arith.chat_templates import TEMPLATES

    line, *models = CHAT_CONFIGS[name]
    text = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {templated[m]}\n    parameters: {{weight: 1.0}}\n" for m in models
    ) + f"dtype: float32\n{line}\n"
    (tmp_path / "c.yaml").write_text(text)
    _run_mergekit_with_tokenizer(text, tmp_path / "mk")
    extra = ["--in-memory"] if executor == "in_memory" else []
    assert main(["merge", str(tmp_path / "c.yaml"), str(tmp_path / "jx"), "--json", *extra]) == 0
    capsys.readouterr()
    want = {"chatml": TEMPLATES["chatml"], "llama3_over_chatml": TEMPLATES["llama3"],
            "literal": LITERAL_TEMPLATE, "auto": TEMPLATES["chatml"].strip()}[name]
    mk = transformers.AutoTokenizer.from_pretrained(tmp_path / "mk")
    jx = transformers.AutoTokenizer.from_pretrained(tmp_path / "jx")
    assert mk.chat_template == want  # the reference itself does what this test says
    assert jx.chat_template == want
    for f in ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json"):
        assert (tmp_path / "jx" / f).read_bytes() == (tmp_path / "mk" / f).read_bytes(), f
    msgs = [{"role": "user", "content": "hi"}]
    assert jx.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        mk.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_builtin_templates_are_mergekits():
    import importlib.resources

    from mergekit._data import chat_templates as mk_templates

    from jaxarith.arith.chat_templates import TEMPLATES

    files = {p.name[:-len(".jinja")]: p.read_text()
             for p in importlib.resources.files(mk_templates).iterdir()
             if p.name.endswith(".jinja")}
    assert files == TEMPLATES


def test_method_specs_match_mergekits_registry():
    """Every method jaxarith lists takes mergekit 0.1.5's parameters with its defaults and
    input counts (jaxarith's extensions: ``consensus``; ``weight`` defaults to 1 where mergekit
    requires it; ``int8_mask`` is accepted and ignored)."""
    from mergekit.merge_methods import registry

    from jaxarith.arith.methods import MERGE_METHODS, describe

    for kind in MERGE_METHODS:
        ours = describe(kind)
        spec = registry.get(str(kind)).spec
        theirs = {p.name: (p.scope.value, p.default) for p in spec.parameters
                  if p.name != "int8_mask"}
        mine = {**{k: ("shared", v) for k, v in ours["parameters"].items()},
                **{k: ("shared", v) for k, v in ours["options"].items() if k != "consensus"},
                **{k: ("non_base" if ours["base_model"] != "none" else "input", v)
                   for k, v in ours["model_parameters"].items()}}
        if str(kind) == "task_arithmetic":
            theirs.pop("rescale")  # does nothing without a trim: refused here
        assert set(mine) == set(theirs), kind
        for k, (scope, default) in theirs.items():
            required = not isinstance(default, bool | int | float | type(None))
            want = None if required else default
            if k == "weight" and required and mine[k][1] == 1.0:
                continue  # jaxarith's default weight 1
            assert mine[k] == (scope, want), (kind, k)
        base = {"required": "required", "optional": "optional", "ignored": "none"}
        assert ours["base_model"] == base[spec.contract.base.value], kind


# ------------------------------------------------------------- mergekit 0.1.5's other methods


@pytest.fixture(scope="module")
def tuned_family(family, tmp_path_factory):
    """{"B": a random float32 Llama, "F1", "F2", "F3": B plus random float32 task vectors of
    different sizes}: continuous values, so sorts and top-k sets have no ties."""
    d = tmp_path_factory.mktemp("mk_tuned")
    b = _tensors(family["R0"])
    rng = np.random.default_rng(7)
    out = {"B": family["R0"]}
    for i, scale in enumerate((0.004, 0.006, 0.01), start=1):
        tensors = {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32)
                   for k, v in b.items()}
        out[f"F{i}"] = str(d / f"F{i}")
        _write_like(family["R0"], out[f"F{i}"], tensors)
    out["AF"] = str(d / "AF")
    _write_like(family["R0"], out["AF"], {k: v + _fusion_delta(rng, v.shape)
                                           for k, v in b.items()})
    return out


def _fusion_delta(rng, shape):
    """A task vector whose Arcee Fusion mask is far from its threshold (the method compares
    ``|delta| * KL`` per HF row with quantiles, and the KL of nearby softmaxes is mostly float32
    rounding: on plain random task vectors a few entries per tensor sit within rounding of the
    threshold, and mergekit's and any other float32 evaluation then keep different ones).

    Per HF row: 55% of rows unchanged (importance exactly 0: the 25% and 50% quantiles), 30%
    changed by +-0.004 everywhere (the 75% quantile: their KL is small), 15% by +-0.004 and, in
    a quarter of their entries, +-0.04 (a KL ~30x larger: all their entries pass 1.5 x that
    quantile). Computing the KL along the wrong axis would keep other entries. 1-D tensors:
    unchanged.
    """
    if len(shape) < 2:
        return np.zeros(shape, np.float32)
    rows, cols = shape[0], int(np.prod(shape[1:]))
    kind = rng.permutation(np.repeat([0, 1, 2], [rows - int(0.3 * rows) - int(0.15 * rows),
                                                 int(0.3 * rows), int(0.15 * rows)]))
    d = 0.004 * rng.choice([-1.0, 1.0], (rows, cols)) * (kind[:, None] > 0)
    big = (kind[:, None] == 2) & (rng.random((rows, cols)) < 0.25)
    d = np.where(big, 10 * d, d)
    return d.reshape(shape).astype(np.float32)


def _models(*entries):
    """YAML ``models:`` lines: each entry a name or (name, parameters as YAML flow text)."""
    lines = ["models:"]
    for e in entries:
        name, params = (e, None) if isinstance(e, str) else e
        lines.append(f"  - model: {{{name}}}")
        if params:
            lines.append(f"    parameters: {{{{{params}}}}}")
    return "\n".join(lines) + "\n"


METHOD_CONFIGS = {
    "nearswap": "merge_method: nearswap\nbase_model: {B}\n" + _models("B", "F1")
                + "parameters: {{t: [0.002, 0.006]}}\n",
    "model_stock": "merge_method: model_stock\nbase_model: {B}\n" + _models("F1", "F2", "F3"),
    "model_stock_filter_wise": "merge_method: model_stock\nbase_model: {B}\n"
                               + _models("F1", "F2", "F3") + "parameters: {{filter_wise: true}}\n",
    "breadcrumbs": "merge_method: breadcrumbs\nbase_model: {B}\n"
                   + _models(("F1", "weight: 0.6, density: 0.7, gamma: 0.05"),
                             ("F2", "weight: 0.5, density: [0.5, 0.9]"))
                   + "parameters: {{lambda: 0.8}}\n",
    "breadcrumbs_ties_rescaled": "merge_method: breadcrumbs_ties\nbase_model: {B}\n"
                                 + _models(("F1", "weight: 1.0, density: 0.6, gamma: 0.02"),
                                           ("F2", "weight: 0.7, density: 0.8"),
                                           ("F3", "weight: 0.4, density: 0.3, gamma: 0.1"))
                                 + "parameters: {{rescale: true, normalize: true}}\n",
    "sce": "merge_method: sce\nbase_model: {B}\n" + _models("F1", "F2", "F3"),
    "sce_topk": "merge_method: sce\nbase_model: {B}\n" + _models("F1", "F2", "F3")
                + "parameters: {{select_topk: [0.3, 0.7]}}\n",
    "nuslerp_base": "merge_method: nuslerp\nbase_model: {B}\n"
                    + _models(("F1", "weight: 0.3"), ("F2", "weight: 0.7")),
    "nuslerp_rows": "merge_method: nuslerp\n"
                    + _models(("F1", "weight: [0.2, 0.6]"), ("F3", "weight: 0.5"))
                    + "parameters: {{nuslerp_flatten: false}}\n",
    "nuslerp_columns": "merge_method: nuslerp\nbase_model: {B}\n"
                       + _models(("F2", "weight: 1.0"), ("F3", "weight: 2.0"))
                       + "parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}\n",
    "multislerp": "merge_method: multislerp\n"
                  + _models(("F1", "weight: 0.2"), ("F2", "weight: 0.5"), ("F3", "weight: 0.3")),
    "multislerp_base": "merge_method: multislerp\nbase_model: {B}\n"
                       + _models(("F1", "weight: 1.0"), ("F2", "weight: [1.0, 3.0]"))
                       + "parameters: {{normalize_weights: true}}\n",
    "arcee_fusion": "merge_method: arcee_fusion\nbase_model: {B}\n" + _models("B", "AF"),
    "ties_rescaled": "merge_method: ties\nbase_model: {B}\n"
                     + _models(("F1", "weight: 1.0, density: 0.5"),
                               ("F2", "weight: 0.5, density: [0.3, 0.8]"))
                     + "parameters: {{rescale: true}}\n",
    "karcher": "merge_method: karcher\n" + _models("F1", "F2", "F3"),
    "karcher_base_added": "merge_method: karcher\nbase_model: {B}\n" + _models("F3", "F1")
                          + "parameters: {{max_iter: 3, tol: 1.0e-6}}\n",
}


@pytest.fixture(scope="module")
def method_merged(tuned_family, tmp_path_factory):
    """{name: (mergekit's dir, jaxarith streamed dir, jaxarith in-memory dir)}."""
    d = tmp_path_factory.mktemp("mk_methods")
    out = {}
    for name, text in METHOD_CONFIGS.items():
        text = text.format(**tuned_family) + "dtype: float32\n"
        (d / f"{name}.yaml").write_text(text)
        _run_mergekit(text, d / f"{name}_mk")
        assert main(["merge", str(d / f"{name}.yaml"), str(d / f"{name}_jx"), "--json"]) == 0
        assert main(["merge", str(d / f"{name}.yaml"), str(d / f"{name}_mem"), "--in-memory",
                     "--json"]) == 0
        out[name] = tuple(str(d / f"{name}_{s}") for s in ("mk", "jx", "mem"))
    return out


@pytest.mark.slow  # moved out of `make test` (its ~10 min budget); CI runs it (make test-slow)
@pytest.mark.parametrize("name", list(METHOD_CONFIGS))
def test_method_matches_mergekit(tuned_family, method_merged, name, capsys):
    """Both executors against mergekit 0.1.5's output, every tensor within 1e-5 (float32)."""
    mk, jx, mem = (_tensors(p) for p in method_merged[name])
    base = _tensors(tuned_family["B"])
    capsys.readouterr()
    assert set(mk) == set(jx) == set(mem)
    worst, changed = 0.0, 0
    for k in mk:
        assert jx[k].dtype == mem[k].dtype == mk[k].dtype == np.float32, k
        assert np.all(np.isfinite(mk[k])), k
        for got in (jx[k], mem[k]):
            diff = float(np.abs(got.astype(np.float64) - mk[k]).max())
            worst = max(worst, diff)
            assert diff <= 1e-5, f"{name}: {k}: max |diff| = {diff:.3g}"
        changed += int(not np.allclose(mk[k], base[k], rtol=0, atol=1e-6))
    assert changed >= len(mk) // 2, changed  # the merge did something to most tensors
    with capsys.disabled():
        print(f"\n{name}: max |jaxarith - mergekit| = {worst:.3g}")
