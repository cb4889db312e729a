"""The generating subcommands of `gptkit` (cli.py builds their parsers): generate, chat and
serve, with the sampling flags they share (every option of generation/sampling.py) and the
retrieval flags of chat and serve (rag.py: replies grounded in an index's documents).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_flags import allow_pickle_flag, quantize_flag
from .config import ConfigError

if TYPE_CHECKING:
    from .rag import RetrievalConfig, Retriever


def cmd_generate(args: argparse.Namespace) -> None:
    from .api import load, sample_config
    from .generation.speculative import Speculated

    sampling = dict(
        _sampling(args),
        num_beams=args.num_beams,
        num_return_sequences=args.num_return_sequences,
        logprobs=args.logprobs,
        prompt_lookup=args.prompt_lookup,
        draft_tokens=args.draft_tokens,
    )
    sample_config(**sampling)  # validate flags before spending time on loading the model
    lm = load(
        args.model,
        device=args.device,
        adapter=args.adapter,
        quantize=args.quantize,
        draft=args.draft_model,
    )
    if args.stream:
        if args.num_return_sequences > 1 or args.num_beams > 1:
            raise ConfigError(
                "--stream prints one sequence: drop --num-beams/--num-return-sequences"
            )
        print(args.prompt, end="", flush=True)
        for piece in lm.stream(args.prompt, **sampling):
            print(piece, end="", flush=True)
        print()
        return
    for i, c in enumerate(lm.complete(args.prompt, **sampling)):
        if args.num_return_sequences > 1:
            print(f"--- sequence {i + 1} ---")
        print(args.prompt + c.text)
        if args.logprobs is not None:
            _print_logprobs(lm.tokenizer.decode, c)
        if isinstance(c, Speculated):
            s = c.stats
            print(
                f"speculative decoding: {s.accepted} of {s.drafted} drafted tokens accepted "
                f"({s.acceptance:.0%}), {s.tokens_per_pass:.2f} tokens per pass of the model",
                file=sys.stderr,
            )


def _print_logprobs(decode, c) -> None:
    """One line per generated token: its log-probability, the token, the best alternatives."""
    for token, logprob, top in zip(c.ids, c.logprobs, c.top_logprobs, strict=True):
        others = "  ".join(f"{decode([t])!r} {lp:.3f}" for t, lp in top.items())
        print(f"{logprob:9.4f}  {decode([token])!r}" + (f"   [{others}]" if others else ""))


def sampling_flags(p: argparse.ArgumentParser, temperature: float, max_new: int | None) -> None:
    """The sampling options every generating command takes (generation/sampling.py)."""
    p.add_argument("--max-new-tokens", type=int, default=max_new)
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0.0 = off")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument(
        "--logit-bias",
        action="append",
        metavar="ID=BIAS",
        help="add BIAS to token ID's logit (repeatable; -100 bans it)",
    )
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--stop-id", type=int, action="append", help="stop token id (repeatable)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")


def _logit_bias(text: str) -> tuple[int, float]:
    token, _, bias = text.partition("=")
    try:
        return int(token), float(bias)
    except ValueError:
        raise ConfigError(f"--logit-bias {text!r} is not ID=BIAS, e.g. 50256=-100") from None


SAMPLING_FLAGS = (
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
)


def _sampling(args: argparse.Namespace) -> dict:
    sampling = {k: getattr(args, k) for k in SAMPLING_FLAGS if getattr(args, k) is not None}
    return dict(
        sampling,
        logit_bias=dict(_logit_bias(b) for b in args.logit_bias or []),
        stop=args.stop or [],
        stop_ids=args.stop_id or [],
    )


def retrieval_flags(p: argparse.ArgumentParser, serve: bool = False) -> None:
    """`--retrieval INDEX` and its settings (rag.RetrievalConfig), for chat and serve."""
    p.add_argument(
        "--retrieval",
        metavar="INDEX",
        type=Path,
        help="answer from this index's documents (from gptkit index): each user turn retrieves "
        "sources, the prompt shows them numbered, the reply cites them as [1], [2]",
    )
    p.add_argument(
        "--sources", type=int, metavar="K", help="--retrieval: sources per reply (default 3)"
    )
    p.add_argument(
        "--min-score",
        type=float,
        metavar="S",
        help="--retrieval: the least cosine similarity a source needs (default 0.3); when none "
        "has it, the reply says the documents do not cover the question",
    )
    p.add_argument(
        "--dense-weight",
        type=float,
        metavar="W",
        help="--retrieval: hybrid search's weight on dense scores, 1 - W on BM25's (default 0.5)",
    )
    p.add_argument(
        "--no-answer",
        metavar="TEXT",
        help="--retrieval: that reply (default: I could not find that in the documents.)",
    )
    if serve:
        p.add_argument(
            "--embedder",
            metavar="SPEC",
            help="the model of /v1/embeddings: minilm, a sentence-transformers directory or "
            "any model gptkit.load takes (default: the index's with --retrieval, else the "
            "served model, mean-pooled)",
        )


def _retrieval_config(args: argparse.Namespace) -> RetrievalConfig | None:
    """rag.RetrievalConfig from the flags (checked before any model loads), or None."""
    given = {"k": args.sources, "min_score": args.min_score, "no_answer": args.no_answer,
             "dense_weight": args.dense_weight}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if args.retrieval is None:
        if given:
            raise ConfigError("--sources, --min-score, --dense-weight and --no-answer set up "
                              "retrieval: give --retrieval INDEX too")  # fmt: skip
        return None
    if args.no_answer is not None and not args.no_answer.strip():
        raise ConfigError("--no-answer is empty; give the reply to send when nothing matches")
    from .rag import RetrievalConfig

    return RetrievalConfig(**given)


def _retriever(args: argparse.Namespace, config: RetrievalConfig) -> Retriever:
    """The rag.Retriever of --retrieval, its embedder loaded now: a missing one is an error at
    the start, not at the first question."""
    from .rag import Retriever
    from .rag_index import Index

    index = Index.open(args.retrieval, device=args.device)
    index.embedder()
    print(
        f"gptkit: answering from {args.retrieval}: {index.summary()}; sources per reply: "
        f"{config.k}, min score {config.min_score:g}",
        file=sys.stderr,
    )
    return Retriever(index, config)


def cmd_chat(args: argparse.Namespace) -> None:
    from .api import load, sample_config
    from .chat import ChatSession, chat_loop

    sampling = _sampling(args)
    sample_config(**sampling)  # validate flags before spending time on loading the model
    retrieval = _retrieval_config(args)
    retriever = _retriever(args, retrieval) if retrieval else None  # a bad index fails first
    lm = load(args.model, device=args.device, adapter=args.adapter, quantize=args.quantize)
    chat_loop(ChatSession(lm, system=args.system, retriever=retriever, **sampling))


def _serve_adapters(specs: list[str]) -> tuple[str | None, dict[str, str]]:
    """`gptkit serve --adapter` values: (the one adapter DIR to put on the model itself, as
    before; {NAME: DIR} of the LoRA adapters to serve side by side, each as model NAME). A
    value that is a directory is a DIR, whatever characters its path has; else NAME=DIR."""
    plain, named = [], {}
    for spec in specs:
        name, equals, directory = spec.partition("=")
        if not equals or Path(spec).is_dir():
            plain.append(spec)
        elif not name or not directory:
            raise ConfigError(f"--adapter {spec!r}: give NAME=DIR, a model name for an adapter")
        elif name in named:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is given twice")
        elif not Path(directory).is_dir():
            raise ConfigError(f"--adapter {spec!r}: {directory} is not an adapter directory")
        else:
            named[name] = directory
    if plain and (named or len(plain) > 1):
        raise ConfigError(
            f"--adapter {plain[0]} puts one adapter on the model itself; to serve several "
            "side by side, name each: --adapter NAME=DIR --adapter NAME2=DIR2"
        )
    return (plain[0] if plain else None), named


def cmd_serve(args: argparse.Namespace) -> None:
    from .api import load
    from .cpu_plan import decode_plan
    from .serve import ServeConfig, serve
    from .serve_guard import read_api_key

    single, adapters = _serve_adapters(args.adapter)
    key = read_api_key(args.api_key_file) if args.api_key_file else None
    config = ServeConfig(
        host=args.host,
        port=args.port,
        api_key=key or args.api_key or os.environ.get("GPTKIT_API_KEY"),
        allowed_hosts=tuple(args.allowed_host),
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        max_seconds=args.max_seconds,
        max_tokens=args.max_tokens,
        shutdown_seconds=args.shutdown_seconds,
        **({} if args.prefill_chunk is None else {"prefill_chunk": args.prefill_chunk}),
    )  # validated before spending time on loading the model
    retrieval = _retrieval_config(args)
    if retrieval and args.embedder:
        raise ConfigError("with --retrieval, /v1/embeddings embeds with the index's embedder "
                          "(its vectors compare with the index's): drop --embedder")  # fmt: skip
    retriever = _retriever(args, retrieval) if retrieval else None  # a bad index fails first
    # Batched decoding wants row-major weights. On the 2-core AMD EPYC a SmolLM2 step of 8 rows
    # took 144 ms with them against 243 ms with a column-major decode plan, which is faster only
    # for a single row (70 vs 83 ms). A row-major plan serves every batch size at least as well
    # as plain row-major weights (4 rows: 41 vs 84 ms), so it is kept.
    batched = config.max_batch > 1
    decode_layout = not batched or not decode_plan().column_major
    lm = load(
        args.model,
        device=args.device,
        adapter=single,
        decode_layout=decode_layout,
        quantize=args.quantize,
    )
    embedder = None
    if args.embedder:
        from .embed import load_embedder

        embedder = load_embedder(args.embedder, device=args.device)
    name = args.name or Path(args.model.rstrip("/")).name
    serve(lm, name, config, adapters, retriever, embedder)


def add_generation_parsers(sub: argparse._SubParsersAction) -> None:
    """`gptkit generate`, `gptkit chat` and `gptkit serve`."""
    p = sub.add_parser("generate", help="generate text from a model")
    p.add_argument("--model", required=True, help="checkpoint, HF dir/hub name, GGUF or model name")
    p.add_argument("--prompt", required=True)
    sampling_flags(p, temperature=0.8, max_new=64)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--num-return-sequences", type=int, default=1)
    p.add_argument(
        "--logprobs",
        type=int,
        metavar="K",
        help="after the text, each token's log-probability and its K best alternatives",
    )
    p.add_argument("--adapter", help="an adapter directory from a finetune run")
    quantize_flag(p)
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=0,
        metavar="K",
        help="speculative decoding: draft K tokens a step by copying from the prompt and output "
        "(the same text, faster when it quotes the prompt)",
    )
    p.add_argument(
        "--draft-model",
        help="speculative decoding: a small model with the same tokenizer drafts tokens",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=4, metavar="K", help="tokens the draft model drafts"
    )
    allow_pickle_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model in the terminal (streaming)")
    p.add_argument("--model", required=True, help="checkpoint, HF dir, GGUF file or model name")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--adapter", help="an adapter directory from a finetune run")
    quantize_flag(p)
    sampling_flags(p, temperature=0.7, max_new=None)  # chat: 256, or half a small context
    retrieval_flags(p)
    allow_pickle_flag(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP API and a web chat page")
    p.add_argument("--model", required=True, help="checkpoint, HF dir, GGUF file or model name")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a LoRA adapter from a finetune run, served beside the base model as the model "
        "NAME (repeat for more: their requests are batched together); a plain DIR puts one "
        "adapter of any kind on the model itself",
    )
    quantize_flag(p)
    p.add_argument("--name", help="the model id clients send (default: the --model name)")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 listens on every interface")
    p.add_argument("--port", type=int, default=8000)
    key = p.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or GPTKIT_API_KEY)")
    key.add_argument("--api-key-file", help="the same, with the key read from a file (not in ps)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        help="a Host name to answer besides localhost when bound to a loopback address",
    )
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="waiting sequences; then 503")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies: 413")
    p.add_argument("--max-seconds", type=float, default=300.0, help="generation time limit")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        help="longer prompts are fed this many tokens at a time between decoding steps",
    )
    p.add_argument(
        "--max-tokens", type=int, default=4096, help="most tokens a request may ask for; more: 400"
    )
    p.add_argument(
        "--shutdown-seconds",
        type=float,
        default=10.0,
        help="on SIGTERM or Ctrl-C, generations still running are cut after this long",
    )
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    retrieval_flags(p, serve=True)
    allow_pickle_flag(p)
    p.set_defaults(func=cmd_serve)
