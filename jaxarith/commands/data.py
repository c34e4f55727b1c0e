"""``jaxarith data tokenize SOURCES... OUT --tokenizer REF --seq-len T``: pre-tokenise training
data into packed windows (ArrayRecord shards + manifest) for a ``kind: tokenized`` source."""

from __future__ import annotations

from jaxarith.commands import _common
from jaxarith.data import tokenized


def register(sub) -> None:
    p = sub.add_parser("data", help="prepare training data (pre-tokenise into shards)",
                       description=__doc__)
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    t = dsub.add_parser(
        "tokenize", help="tokenise and pack text/jsonl/parquet/datasets into ArrayRecord shards",
        description="Tokenise documents exactly as a text source of the same options would "
                    "(EOS after each, the last --eval-fraction held out, packed into --seq-len "
                    "windows) and write them as ArrayRecord shards with a manifest; train from "
                    "them with a data source `kind: tokenized`, `path: OUT`.")
    t.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="input files (text, .jsonl, .parquet), globs (sorted), `datasets` "
                        "directories (save_to_disk or a local builder) or bundled:code / "
                        "bundled:docs; read in the order given, as one source")
    t.add_argument("out", metavar="OUT", help="output directory (written atomically)")
    t.add_argument("--tokenizer", required=True, metavar="REF",
                   help="'bundled', a directory with tokenizer files (model or tokenizer) or "
                        "a hub id: the run's model.tokenizer")
    t.add_argument("--seq-len", type=int, required=True, help="tokens per window")
    t.add_argument("--kind", default="", choices=("", "text", "jsonl", "parquet", "datasets"),
                   help="input kind (default: by suffix; a directory is a `datasets` dataset)")
    t.add_argument("--text-field", default="text", help="column / key holding the text")
    t.add_argument("--split", default="train", help="`datasets` split")
    t.add_argument("--doc-separator", default="\n\n",
                   help="text files are split into documents at this string (default: a blank "
                        "line)")
    t.add_argument("--max-docs", type=int, default=0, help="read at most this many documents")
    t.add_argument("--eval-fraction", type=float, default=0.05,
                   help="held-out fraction of documents (the run's data.eval_fraction)")
    t.add_argument("--add-bos", action="store_true", help="BOS before every document "
                   "(the run's data.add_bos)")
    t.add_argument("--workers", type=int, default=0,
                   help="tokenising threads (default: the number of CPUs)")
    t.add_argument("--batch-docs", type=int, default=256, help="documents per tokenizer call")
    t.add_argument("--shard-windows", type=int, default=16384,
                   help="windows per shard (bounds the reader's per-shard buffers)")
    t.add_argument("--overwrite", action="store_true",
                   help="replace OUT if jaxarith wrote it")
    _common.add_json(t)
    t.set_defaults(handler=handle_tokenize)


def handle_tokenize(args) -> int:
    opts = tokenized.ReadOptions(kind=args.kind, text_field=args.text_field, split=args.split,
                                 doc_separator=args.doc_separator, max_docs=args.max_docs)
    m = tokenized.tokenize_to_dir(
        args.sources, args.out, tokenizer_ref=args.tokenizer, seq_len=args.seq_len, opts=opts,
        eval_fraction=args.eval_fraction, add_bos=args.add_bos, workers=args.workers,
        batch_docs=args.batch_docs, shard_windows=args.shard_windows, overwrite=args.overwrite,
        progress=_common.progress_enabled(args))
    tr, ev = m["splits"]["train"], m["splits"]["eval"]
    result = {"out": args.out, "seq_len": m["seq_len"], "tokenizer_sha256":
              m["tokenizer"]["sha256"], "train_windows": tr["windows"],
              "eval_windows": ev["windows"], "documents": tr["documents"] + ev["documents"],
              "tokens": tr["tokens"] + ev["tokens"],
              "shards": len(tr["shards"]) + len(ev["shards"])}
    _common.emit(args, result,
                 f"{args.out}: {tr['windows']} train + {ev['windows']} eval windows of "
                 f"{m['seq_len']} tokens from {result['documents']} documents "
                 f"({result['tokens']} tokens, {result['shards']} shards)")
    return 0
