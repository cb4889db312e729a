"""`gptkit index` and `gptkit search`: a folder of documents into a retrieval index, and the
index queried from the shell (rag_index.py does the work; docs/RETRIEVAL.md shows it).

    gptkit index ../shared/data/banking-kb/documents.json.gz --out runs/idx
    gptkit search runs/idx "how do I dispute a card charge?" -k 3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_flags import dtype_flag
from .config import ConfigError
from .rag_index import DENSE_WEIGHT, MODES


def cmd_index(args: argparse.Namespace) -> None:
    from .rag_index import add_documents, build_index, delete_documents

    if args.delete:
        if args.docs:
            raise ConfigError("--delete takes document ids, not files; give no DOCS with it")
        index = delete_documents(args.out, args.delete)
    elif not args.docs:
        raise ConfigError("name the documents to index: gptkit index DOCS... --out INDEX")
    elif args.add:
        index = add_documents(
            args.out, args.docs, args.text_field, dtype=args.dtype, device=args.device
        )
    else:
        missing = [str(p) for p in args.docs if not p.exists()]
        if missing:  # before the embedder takes its seconds to load
            raise ConfigError(f"{missing[0]}: no such file or folder")
        from .embed import load_embedder

        embedder = load_embedder(args.embedder, device=args.device, dtype=args.dtype)
        index = build_index(
            args.docs,
            args.out,
            embedder,
            chunk_tokens=args.chunk_tokens,
            overlap=args.overlap,
            text_field=args.text_field,
            overwrite=args.overwrite,
        )
    if index.skipped:
        names = ", ".join(p.name for p in index.skipped[:5])
        more = f" and {len(index.skipped) - 5} more" if len(index.skipped) > 5 else ""
        print(f"skipped {len(index.skipped)} file(s) that hold no documents: {names}{more}")
    print(f"{args.out}: {index.summary()}")


def cmd_search(args: argparse.Namespace) -> None:
    from .rag_index import Index

    if args.k < 1:
        raise ConfigError(f"-k must be at least 1, got {args.k}")
    index = Index.open(args.index, device=args.device)
    hits = index.search(args.query, k=args.k, mode=args.mode, dense_weight=args.dense_weight)
    if args.json:
        for hit in hits:
            print(json.dumps(hit.to_dict(), ensure_ascii=False))
        return
    if not hits:
        print("no match")
    for hit in hits:
        text = " ".join(hit.text.split())
        print(f"{hit.rank}. {hit.score:.4f}  {hit.doc_id}  {hit.title}")
        print(f"   {text[:300]}{'...' if len(text) > 300 else ''}")


def add_rag_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("index", help="documents -> a retrieval index (embeddings, FAISS, BM25)")
    p.add_argument("docs", nargs="*", type=Path, help="files or folders (txt/md/html/json/jsonl)")
    p.add_argument("--out", required=True, type=Path, help="the index directory")
    p.add_argument("--embedder", default="minilm", help="minilm, a sentence-transformers dir, "
                   "or any model gptkit.load takes (mean-pooled)")  # fmt: skip
    p.add_argument("--chunk-tokens", type=int, default=200, help="tokens per chunk")
    p.add_argument("--overlap", type=int, default=40, help="tokens shared by neighbouring chunks")
    p.add_argument("--text-field", help="JSON/JSONL: the text's field (default: text or content)")
    p.add_argument("--add", action="store_true", help="add DOCS to an existing index")
    p.add_argument("--delete", nargs="+", metavar="ID", help="remove these documents")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index")
    p.add_argument("--device", default=None)
    dtype_flag(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="the chunks of an index that best match a query")
    p.add_argument("index", type=Path)
    p.add_argument("query")
    p.add_argument("-k", type=int, default=5, help="how many chunks")
    p.add_argument("--mode", choices=MODES, default="hybrid", help="hybrid: both, scores fused")
    p.add_argument("--dense-weight", type=float, default=DENSE_WEIGHT,
                   help=f"hybrid: the dense scores' weight ({DENSE_WEIGHT})")  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object per hit")
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_search)
