"""`gptkit <subcommand>`: each subcommand parses its flags and calls one library function.

User errors (bad flag values, missing or damaged files, prompts that do not fit) print one line,
`gptkit: error: ...`, and exit with status 2; a traceback means a bug in gptkit.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .cli_flags import allow_pickle_flag, checked_device, dtype_flag, quantize_flag
from .cli_generate import add_generation_parsers
from .cli_monitor import add_monitor_parser
from .cli_predict import add_predict_parser
from .cli_rag import add_rag_parsers
from .cli_rank import add_recommend_parser
from .config import QUANTIZE_CHOICES, ConfigError, first_line
from .distributed import end_worker, torchrun_worker
from .rag_index import DENSE_WEIGHT

# Every gptkit user-facing error (ConfigError, CheckpointError, ConversionError, TokenizerError,
# ContextLengthError, ChatTemplateError, PrepareError, ...) is a ValueError; OSError covers
# missing and unreadable files.
USER_ERRORS = (ValueError, OSError)


def cmd_presets(args: argparse.Namespace) -> None:
    import json

    import torch

    from .config import PRESETS, preset
    from .model import GPT

    if args.name:
        print(json.dumps(preset(args.name).to_dict(), indent=2))
        return

    header = ("preset", "params", "layers", "d_model", "heads", "kv", "context")
    print("{:<14} {:>16} {:>6} {:>7} {:>5} {:>3} {:>7}  style".format(*header))
    for name in PRESETS:
        config = preset(name)
        with torch.device("meta"):  # counts shapes without allocating any weight
            n = GPT(config).num_params()
        style = f"{config.positions}/{config.norm}/{config.activation}" + (
            "/post-norm" if not config.prenorm else ""
        )
        if config.attention == "alternating":
            style += "/sparse-alternating"
        print(
            f"{name:<14} {n:>16,} {config.n_layer:>6} {config.n_embd:>7} {config.n_head:>5} "
            f"{config.n_kv_head:>3} {config.block_size:>7}  {style}"
        )


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .tokenizer import train_bpe

    tokenizer = train_bpe(args.input, vocab_size=args.vocab_size, special_tokens=args.special)
    tokenizer.save(args.out)
    print(f"trained a byte-level BPE with {tokenizer.vocab_size} tokens; saved to {args.out}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from .prepare import prepare
    from .tokenizer_files import load_tokenizer

    meta = prepare(
        args.sources,
        args.out,
        load_tokenizer(args.tokenizer),
        text_column=args.text_column,
        val_fraction=args.val_fraction,
        seed=args.seed,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        dataset=args.dataset,
        dataset_split=args.dataset_split,
    )
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"prepared {train['tokens']:,} train tokens ({train['documents']:,} documents, "
        f"{len(train['shards'])} shards) and {val['tokens']:,} val tokens "
        f"({val['documents']:,} documents) from {meta['bytes'] / 1e6:.1f} MB in "
        f"{meta['seconds']:.1f} s ({meta['mb_per_s']:.2f} MB/s); wrote {args.out}"
    )


def cmd_pretrain(args: argparse.Namespace) -> None:

    from .train import train
    from .train_config import load_train_config

    # An optional TOML file first, then KEY=VALUE overrides.
    path = args.settings[0] if args.settings and "=" not in args.settings[0] else None
    config = load_train_config(path, args.settings[1:] if path else args.settings)
    result = train(config, resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one report
        val = f"val loss {result.val_loss:.4f}, " if result.val_loss is not None else ""
        print(
            f"trained to step {result.steps}: {val}{result.tokens_per_s:,.0f} tokens/s, "
            f"{result.ms_per_step:.1f} ms/step, MFU {result.mfu:.1%}; "
            f"checkpoint in {result.checkpoint}"
        )


def _finetune_config(args: argparse.Namespace):
    """FinetuneConfig from [CONFIG.toml] KEY=VALUE..., the objective, --model and --data."""
    from .train_config import FinetuneConfig, load_train_config

    settings = list(args.settings)
    path = settings.pop(0) if settings and "=" not in settings[0] else None
    settings.insert(0, f"objective={args.objective}")
    for key, value in (("init_from", args.model), ("data", args.data)):
        if value is not None:
            settings.append(f"{key}={_toml_string(value)}")
    return load_train_config(path, settings, cls=FinetuneConfig)


def _toml_string(text: str) -> str:
    import json

    return json.dumps(text)  # a JSON string is a TOML basic string


def cmd_finetune(args: argparse.Namespace) -> None:

    from .finetune import describe, finetune

    result = finetune(_finetune_config(args), resume=args.resume, overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"fine-tuned: {describe(result)}")


def cmd_tune(args: argparse.Namespace) -> None:
    from .tune import tune

    result = tune(_finetune_config(args), trials=args.trials, seed=args.seed)
    for t in result.trials:
        print(f"trial {t['number']}: val loss {t['val_loss']:.4f} {t['params']} {t['metrics']}")
    print(
        f"best: trial {result.best_trial}, val loss {result.best_val_loss:.4f}, "
        f"{result.best_params}"
    )


def cmd_eval(args: argparse.Namespace) -> None:
    from . import precision
    from .api import load
    from .evaltasks import run_eval
    from .evaluate import format_table, save_results

    if args.dtype != "float32" and args.task in ("retrieval", "rag", "code"):
        raise ConfigError(f"--dtype is for eval of a model's scores, not eval {args.task}")
    if args.task in ("retrieval", "rag"):
        from .rag_eval import cmd_eval_rag

        return cmd_eval_rag(args)
    if not args.model:
        raise ConfigError(f"eval {args.task} needs --model")
    if args.task == "code":
        from .code_eval import cmd_eval_code

        return cmd_eval_code(args)
    if args.task == "rank":
        from .cli_rank import cmd_eval_rank

        return cmd_eval_rank(args)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    options = dict(
        limit=args.limit,
        stride=args.stride,
        text_field=args.text_field,
        label_field=args.label_field,
        word_column=args.word_column,
        tag_column=args.tag_column,
        metrics=metrics,
        max_new_tokens=args.max_new_tokens or 64,
        chat=not args.no_chat_template,
        lang=args.lang,
        shots=args.shots,
        train=args.train,
        ref=args.ref,
        beta=args.beta,
        max_length=args.max_length,
    )
    device = checked_device(args)
    lm = load(args.model, device=device, adapter=args.adapter, quantize=args.quantize)
    with precision.compute(args.dtype, device):
        results = run_eval(args.task, lm, args.data, **options)
    print(format_table(results, title=f"{args.task}: {', '.join(args.data)}"))
    if args.out:
        save_results({"task": args.task, "model": args.model, **results}, args.out)
        print(f"saved to {args.out}")


def cmd_merge(args: argparse.Namespace) -> None:
    from .api import load
    from .checkpoint import save_checkpoint
    from .peft import merge_peft

    lm = load(args.model, device="cpu", adapter=args.adapter, decode_layout=False)
    save_checkpoint(args.out, merge_peft(lm.model), lm.tokenizer)
    print(f"wrote the merged model to {args.out}")


def cmd_plot(args: argparse.Namespace) -> None:
    from .plot import plot_run

    runs = args.run_dirs[0] if len(args.run_dirs) == 1 else args.run_dirs
    print(f"wrote {plot_run(runs, args.out)}")


def cmd_explain(args: argparse.Namespace) -> None:
    from .api import load
    from .explain import explain, format_table

    lm = load(args.model, device=args.device, adapter=args.adapter)
    ex = explain(lm, args.text, args.out, layers=args.layers, head=args.head)
    print(format_table(ex))
    print(f"attention maps and log-probabilities: {ex.path}")


def cmd_convert(args: argparse.Namespace) -> None:
    from .api import load
    from .checkpoint import load_checkpoint, save_checkpoint
    from .convert import classifier_padding, export_hf
    from .peft import MERGEABLE, merge_peft, peft_config
    from .quantize import quantize

    if args.type is not None and args.to != "gguf":
        raise ConfigError(f"--type {args.type} is for --to gguf")
    if args.quantize is not None and args.to != "gptkit":
        raise ConfigError(f"--quantize {args.quantize} writes a gptkit checkpoint (--to gptkit)")
    if args.to == "peft":  # the adapter alone, for the base's --to hf export
        from .peft_format import export_peft

        model, _, meta = load_checkpoint(args.source)
        trained = (meta.get("train") or {}).get("config") or {}  # a fine-tune's settings
        out = export_peft(model, args.out, base=trained.get("init_from"))
        print(f"wrote a PEFT adapter directory ({model.peft.method}) to {out}")
        return
    if args.to == "hf":
        model, tokenizer, _ = load_checkpoint(args.source)
    else:  # any model gptkit loads: a checkpoint, a GGUF file, a Hugging Face model, a name
        lm = load(args.source, device="cpu", decode_layout=False)
        model, tokenizer = lm.model, lm.tokenizer
    peft = peft_config(model)
    if peft is not None and peft.method in MERGEABLE:  # a LoRA / (IA)^3 run exports merged
        model = merge_peft(model)
    if args.to == "gptkit":
        if args.quantize is not None:
            quantize(model, args.quantize)  # saved as int8: it loads quantized, no fp32 copy
        save_checkpoint(args.out, model, tokenizer, extra={"source": str(args.source)})
        size = (args.out / "model.safetensors").stat().st_size / 1e6
        kind = f"an {args.quantize}" if args.quantize else "a"
        print(f"wrote {kind} gptkit checkpoint ({size:.1f} MB of weights) to {args.out}")
        return
    if args.to == "gguf":
        from .export_gguf import export_gguf

        kind = args.type or "f32"
        path = export_gguf(model, tokenizer, args.out, kind, name=Path(args.source).name)
        print(f"wrote a {kind} GGUF file ({path.stat().st_size / 1e6:.1f} MB) to {path}")
        return
    ids = {}
    if tokenizer is not None:  # so transformers' generate() knows where text ends
        ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
        if model.config.head == "classify":
            ids["pad_token_id"] = classifier_padding(tokenizer)
    out = export_hf(model, args.out, **ids)
    if tokenizer is not None:
        tokenizer.save(out)
    print(f"wrote a Hugging Face model directory to {out}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.out, args.corpus, args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptkit", description="A complete, readable GPT toolkit.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list the named model shapes with parameter counts")
    p.add_argument("name", nargs="?", help="print this preset's full config as JSON")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE tokenizer on text files")
    t.add_argument("--input", nargs="+", required=True, type=Path, help="text files")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument(
        "--special",
        nargs="*",
        default=[],
        help="special tokens besides <|endoftext|>, which every gptkit tokenizer has",
    )
    t.add_argument("--out", required=True, type=Path, help="output directory")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize a corpus into token shards + meta.json")
    p.add_argument("sources", nargs="*", type=Path, help=".txt/.md/.jsonl/.csv/.parquet or folders")
    # a str, not a Path: Path("") is ".", and an empty --out must be refused, not the cwd
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--tokenizer", default="gpt2", help="tokenizer directory, tokenizer.json or name"
    )
    p.add_argument("--text-column", default="text", help="column of jsonl/csv/parquet rows")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents for val")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--workers", type=int, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard")
    p.add_argument("--dataset", help="a Hugging Face datasets name, streamed (needs `datasets`)")
    p.add_argument("--dataset-split", default="train")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "pretrain",
        help="pretrain a GPT on `gptkit prepare` output (under torchrun: DDP, or FSDP)",
        description="Settings come from a TOML file of TrainConfig keys, then KEY=VALUE "
        "overrides (values in TOML syntax: lr=3e-4 compile=true model.n_layer=6).",
    )
    p.add_argument("settings", nargs="*", metavar="[CONFIG.toml] KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace out_dir's checkpoint")
    allow_pickle_flag(p)
    p.set_defaults(func=cmd_pretrain)

    objectives = ["lm", "sft", "classify", "tag", "rank", "distill", "reward", "dpo"]
    for name, help_text in (
        ("finetune", "fine-tune: lm, sft, classify, tag, rank, distill, reward, dpo (+ LoRA...)"),
        ("tune", "search lr, batch size and LoRA rank for a finetune run (Optuna)"),
    ):
        p = sub.add_parser(
            name,
            help=help_text,
            description="Settings come from a TOML file of FinetuneConfig keys, then KEY=VALUE "
            "overrides (e.g. peft.method=lora peft.r=16 lr=2e-4 epochs=3 val_data=dev.jsonl).",
        )
        p.add_argument("objective", choices=objectives)
        p.add_argument("settings", nargs="*", metavar="[CONFIG.toml] KEY=VALUE")
        p.add_argument("--model", help="model to fine-tune (sets init_from)")
        p.add_argument("--data", help="training data (sets data)")
        allow_pickle_flag(p)
        if name == "finetune":
            p.add_argument("--resume", action="store_true", help="continue out_dir's run")
            p.add_argument("--overwrite", action="store_true", help="replace out_dir's run")
            p.set_defaults(func=cmd_finetune)
        else:
            p.add_argument("--trials", type=int, default=8)
            p.add_argument("--seed", type=int, default=0, help="seed of the search")
            p.set_defaults(func=cmd_tune)

    p = sub.add_parser("eval", help="score a model: perplexity, classify, generate, preference...")
    p.add_argument(
        "task",
        choices=[
            *("perplexity", "classify", "tag", "generate", "choice", "code", "retrieval", "rag"),
            *("rank", "preference"),
        ],
    )
    p.add_argument("--model", help="checkpoint, HF dir/hub name, GGUF or name")
    p.add_argument("--adapter", help="an adapter directory from a finetune run")
    quantize_flag(p)
    dtype_flag(p)
    p.add_argument("--data", required=True, nargs="+", help="data file(s)")
    p.add_argument("--limit", type=int, default=0, help="score only the first N examples")
    p.add_argument("--out", type=Path, help="also save the results as JSON")
    p.add_argument("--device", default=None)
    p.add_argument("--stride", type=int, help="perplexity: window stride (default: half)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--word-column", type=int, help="tag: column of the words (from 0)")
    p.add_argument("--tag-column", type=int, help="tag: column of the tags (from 0)")
    p.add_argument("--metrics", default="bleu,chrf,rouge,exact_match", help="generate: metrics")
    p.add_argument(
        "--max-new-tokens", type=int, help="generate, code: per reply (default 64; code 384)"
    )
    p.add_argument("-n", type=int, default=1, help="code: samples per problem (for pass@k)")
    p.add_argument(
        "--temperature", type=float, default=0.0, help="code: sampling temperature (0: greedy)"
    )
    p.add_argument("--no-chat-template", action="store_true", help="generate, code: plain prompts")
    p.add_argument(
        "--lang",
        choices=["en", "zh"],
        help="generate: how BLEU and ROUGE split words (default: told from the references)",
    )
    p.add_argument("--shots", type=int, default=0, help="choice: examples in the prompt")
    p.add_argument("--train", help="choice: file to draw the shots from")
    p.add_argument("--ref", help="preference: the reference model of a DPO policy")
    p.add_argument("--beta", type=float, default=0.1, help="preference: DPO's beta (0.1)")
    p.add_argument("--max-length", type=int, default=1024, help="preference: tokens per row")
    p.add_argument("--index", type=Path, help="retrieval, rag: the index (from gptkit index)")
    p.add_argument("--mode", help="retrieval: dense,bm25,hybrid; rag: closed-book|retrieved|oracle")
    p.add_argument("-k", type=int, help="rag: sources in the prompt (default 3); rank: HR@k")
    p.add_argument("--dense-weight", type=float, default=DENSE_WEIGHT,
                   help=f"retrieval, rag: hybrid's weight on dense ({DENSE_WEIGHT})")  # fmt: skip
    p.add_argument("--users", type=int, help="rank: a seeded sample of this many users (0: all)")
    p.add_argument("--negatives", type=int, help="rank: sampled candidates per user (99)")
    p.add_argument("--full", action="store_true", help="rank: against every unseen item")
    p.add_argument("--history", type=int, help="rank: history items shown (default: as trained)")
    p.add_argument("--split", choices=["test", "val"], default="test", help="rank: which target")
    allow_pickle_flag(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("merge", help="fold a LoRA or (IA)^3 adapter into its base model's weights")
    p.add_argument("--model", required=True, help="the base model, or a LoRA checkpoint")
    p.add_argument("--adapter", help="adapter directory (omit when --model holds the LoRA)")
    p.add_argument("out", type=Path)
    allow_pickle_flag(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("plot", help="draw a run's loss curves (metrics.jsonl) to a PNG")
    p.add_argument("run_dirs", nargs="+", type=Path, help="run directories (out_dir)")
    p.add_argument("--out", type=Path, help="PNG path (default: RUN_DIR/loss.png)")
    p.set_defaults(func=cmd_plot)

    add_generation_parsers(sub)

    p = sub.add_parser("explain", help="a PNG of per-layer attention and per-token logprobs")
    p.add_argument("--model", required=True, help="checkpoint, HF dir, GGUF file or model name")
    p.add_argument("--text", required=True)
    p.add_argument("--out", type=Path, default=Path("explain.png"))
    p.add_argument("--layers", type=int, nargs="+", help="layers to draw (default: all)")
    p.add_argument("--head", type=int, help="one head (default: the mean over heads)")
    p.add_argument("--adapter", help="an adapter directory from a finetune run")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    allow_pickle_flag(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "convert", help="Hugging Face model -> gptkit checkpoint, or out (--to hf, --to gguf)"
    )
    p.add_argument(
        "source",
        help="HF directory or hub name; a gptkit checkpoint with --to hf; any model with --to gguf",
    )
    p.add_argument("out", type=Path)
    p.add_argument("--to", choices=["gptkit", "hf", "gguf", "peft"], default="gptkit")
    p.add_argument(
        "--type",
        help="--to gguf: the weights' type, f32 (default), f16, q8_0, q5_1, q5_0, q4_1 or q4_0 "
        "(norms and biases stay f32)",
    )
    p.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="--to gptkit: save int8 weights for the CPU; the checkpoint loads already quantized",
    )
    allow_pickle_flag(p)
    p.set_defaults(func=cmd_convert)

    add_predict_parser(sub)
    add_monitor_parser(sub)
    add_rag_parsers(sub)
    add_recommend_parser(sub)

    p = sub.add_parser("demo", help="the main job: a GPT trained on Shakespeare, then sampled")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="pretrain settings")
    p.add_argument("--out", type=Path, default=Path("runs/shakespeare"))
    p.add_argument("--corpus", type=Path, default=Path("runs/corpus"), help="sdist folder")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    if not torchrun_worker():
        return run(argv)
    # A torchrun worker ends with os._exit, its process group left standing (see
    # distributed.end_worker); a traceback is printed first, as Python would.
    try:
        code = run(argv)
    except Exception:
        traceback.print_exc()
        code = 1
    end_worker(code)


def run(argv: list[str] | None) -> int:
    """Parse `argv` and run its subcommand; the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE settings may follow flags (`finetune sft --model M lr=1e-4`), which argparse
    # leaves over once the positional list has been filled.
    if extra and hasattr(args, "settings") and not any(a.startswith("-") for a in extra):
        args.settings += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "allow_pickle", False):
            from .convert import allowing_pickle

            # One switch for every loader the command reaches (init_from, a teacher, ...).
            with allowing_pickle():
                args.func(args)
        else:
            args.func(args)
    except USER_ERRORS as e:
        print(f"gptkit: error: {first_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gptkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
