"""``jaxarith average REFS... OUT --method uniform|lawa|greedy``: average checkpoints.

REFS are model references (HF hub id, HF directory, jaxarith Orbax directory) or training run
directories (all of a run's train-state checkpoints, by step; only their parameters are read).

* ``uniform``: the mean of all inputs (or of the ``--last K``), streamed tensor by tensor.
* ``lawa``: the mean of the ``--last K`` checkpoints (latest-weight averaging after the fact;
  a run keeps only ``checkpoint.keep`` checkpoints, so it needs ``keep >= K``).
* ``greedy``: a greedy soup (Wortsman et al. 2022) scored on ``--eval-text`` or the held-out
  split of ``--eval-config``'s data; the JSON lists every candidate with its loss and whether
  it was kept.
"""

from __future__ import annotations

from jaxarith import data as data_lib
from jaxarith.average import soups
from jaxarith.average.soups import load_tokenizer
from jaxarith.commands import _common
from jaxarith.errors import ConfigError, JaxarithError
from jaxarith.io import paths
from jaxarith.io.atomic import check_destination
from train.config import load_train_config


def register(sub) -> None:
    p = sub.add_parser("average", help="average checkpoints: uniform, LaWA (last K), greedy soup",
                       description=__doc__)
    p.add_argument("refs", nargs="+", metavar="REF",
                   help="model references or training run directories")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--method", choices=("uniform", "lawa", "greedy"), default="uniform")
    p.add_argument("--last", type=int, default=None, metavar="K",
                   help="keep the K latest checkpoints (required by lawa)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--eval-text", default=None, metavar="FILE",
                     help="held-out UTF-8 text scoring the greedy soup")
    src.add_argument("--eval-config", default=None, metavar="CONFIG",
                     help="train config whose held-out data scores the greedy soup")
    p.add_argument("--seq-len", type=int, default=None,
                   help="greedy: scoring window length (default: the model's context length, "
                        "or data.seq_len with --eval-config)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--to", choices=("hf", "orbax"), default="hf", help="output format")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="output dtype (default: the first input's)")
    p.add_argument("--overwrite", action="store_true")
    _common.add_mesh(p)
    _common.add_json(p)
    p.set_defaults(handler=handle)


def held_out_ids(args, cand) -> tuple[list[int], int | None]:
    """(token ids, window length) of the greedy soup's held-out data."""
    if args.eval_text:
        with open(args.eval_text, encoding="utf-8") as f:
            ids = load_tokenizer(cand)(f.read())["input_ids"]
        if len(ids) < 2:
            raise JaxarithError(f"{args.eval_text}: fewer than two tokens to score")
        return ids, args.seq_len
    if args.eval_config:
        import numpy as np

        tcfg = load_train_config(args.eval_config, ["out=unused"])
        sources = data_lib.load_sources(tcfg.data, load_tokenizer(cand))
        held = [s.eval.reshape(-1) for s in sources if len(s.eval)]
        if not held:
            raise ConfigError(f"{args.eval_config}: no source has a held-out split "
                              "(data.eval_fraction)")
        return np.concatenate(held).tolist(), args.seq_len or tcfg.data.seq_len
    raise ConfigError("--method greedy needs held-out data: --eval-text FILE or "
                      "--eval-config CONFIG")


def handle(args) -> int:
    if args.method == "lawa" and args.last is None:
        raise ConfigError("--method lawa averages the latest K checkpoints: give --last K")
    if args.method == "greedy" and not (args.eval_text or args.eval_config):
        raise ConfigError("--method greedy needs held-out data: --eval-text FILE or "
                          "--eval-config CONFIG")
    if paths.is_url(args.out):  # written locally, then uploaded marker last
        with paths.staged_output(args.out, kind=f"average ({args.method})",
                                 overwrite=args.overwrite) as local:
            info, text = _average(args, local)
    else:
        check_destination(args.out, args.overwrite)
        info, text = _average(args, args.out)
    _common.emit(args, info, text)  # after the output is complete (uploaded)
    return 0


def _average(args, out: str) -> tuple[dict, str]:
    """Write the average at ``out``; returns (the JSON report, the human text)."""
    progress = _common.progress_enabled(args)
    cands = soups.open_candidates(args.refs, last=args.last)
    if args.method in ("uniform", "lawa"):
        mesh = _common.mesh_from(args) if args.to == "orbax" else None
        info = soups.uniform(cands, out, to=args.to, dtype=args.dtype,
                             overwrite=args.overwrite, progress=progress, mesh=mesh)
        info.update(method=args.method, out=args.out)
        return info, f"{args.method}: mean of {len(cands)} checkpoints -> {args.out}"
    mesh = _common.mesh_from(args)
    ids, seq_len = held_out_ids(args, cands[0])
    report, soup, _ = soups.greedy(cands, ids, mesh=mesh, seq_len=seq_len,
                                   batch_size=args.batch_size, progress=progress)
    with soups.tokenizer_dir(cands[0]) as tok:
        soups.write(cands[0].config, out, params=soup, to=args.to,
                    dtype=args.dtype or "float32", tokenizer=tok, overwrite=args.overwrite,
                    progress=progress)
    report.update(out=args.out, to=args.to)
    lines = [f"{'kept' if c['kept'] else '    '}  {c['loss']:.6f}  {c['ref']}"
             for c in report["candidates"]]
    return report, "\n".join([*lines, f"soup loss {report['soup_loss']:.6f} "
                                      f"({len(report['kept'])} kept) -> {args.out}"])
