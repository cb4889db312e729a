"""Fine-tune and score on the real data sets in ../shared/data, for docs/RESULTS.md.

    python bench/finetune_results.py --model here      # the Shakespeare GPT from `make demo`
    python bench/finetune_results.py --model smollm2   # SmolLM2-135M-Instruct + LoRA
    python bench/finetune_results.py --model smollm2 --only sst2 trec

Each task: convert the shared files to a format `gptkit finetune` reads (into runs/results/
data, never into the repo), fine-tune with the settings below, score the test split with the
same functions as `gptkit eval`, and compute a trivial baseline (majority class, all-"O", copy
the input). One JSON line per run goes to runs/results/results.jsonl.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptkit.api import load  # noqa: E402
from gptkit.evaltasks import eval_classify, eval_generate, eval_tag  # noqa: E402
from gptkit.evaluate import classification_metrics, generation_metrics, tagging_metrics  # noqa: E402
from gptkit.finetune import describe, finetune  # noqa: E402
from gptkit.tagging import read_tagged  # noqa: E402
from gptkit.taskdata import read_chat, read_classification  # noqa: E402
from gptkit.train_config import FinetuneConfig, PeftConfig  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
OUT = ROOT / "runs" / "results"
MODELS = {
    "here": str(ROOT / "runs" / "shakespeare" / "checkpoint"),
    "smollm2": "smollm2-135m-instruct",
    "smollm2-zero-shot": "smollm2-135m-instruct",  # generation tasks, no fine-tuning: a reference
}
# A smoke run (--max-steps, --test-limit; tests/test_docs.py runs every documented command so).
# A results run takes both cores; a smoke keeps torch's thread count, which `make test` sets to
# each test worker's share of them (two threads where two workers share two cores spin in
# OpenMP's barriers against the other worker).
SMOKE: dict = {"settings": {}, "test_limit": 0, "threads": 2}


def _write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _lines(path: Path, encoding: str = "utf-8") -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding=encoding) as f:
        return [line.rstrip("\n") for line in f]


# -- data: shared files -> (train, val, test) paths -----------------------------------------


def sst2() -> tuple[Path, Path, Path]:
    """Binary SST-2 (stsa.binary: "label sentence")."""
    names = {"0": "negative", "1": "positive"}

    def convert(split):
        rows = [line.split(" ", 1) for line in _lines(SHARED / "sst2" / f"stsa.binary.{split}")]
        return _write_jsonl(
            OUT / "data" / f"sst2-{split}.jsonl",
            [{"text": t, "label": names[lab]} for lab, t in rows],
        )

    return convert("train"), convert("dev"), convert("test")


def trec() -> tuple[Path, Path, Path]:
    """TREC-6 question types ("label question", labels 0..5 as in SOURCE.txt); val = the last
    500 training questions."""
    names = ["DESC", "ENTY", "ABBR", "HUM", "LOC", "NUM"]

    def rows(name):
        lines = _lines(SHARED / "trec" / name, encoding="latin-1")  # not UTF-8
        return [
            {"text": t, "label": names[int(lab)]} for lab, t in (x.split(" ", 1) for x in lines)
        ]

    train = rows("TREC.train.all")
    return (
        _write_jsonl(OUT / "data" / "trec-train.jsonl", train[:-500]),
        _write_jsonl(OUT / "data" / "trec-val.jsonl", train[-500:]),
        _write_jsonl(OUT / "data" / "trec-test.jsonl", rows("TREC.test.all")),
    )


def wnut17():
    d = SHARED / "wnut17"
    return d / "wnut17train.conll", d / "emerging.dev.conll", d / "emerging.test.annotated"


def ud_ewt():
    d = SHARED / "ud-english-ewt"
    return d / "en_ewt-ud-train.conllu", d / "en_ewt-ud-dev.conllu", d / "en_ewt-ud-test.conllu"


def self_instruct():
    """Train on the 175 seed tasks, test on the 252 user-oriented instructions."""
    d = SHARED / "self-instruct"
    seed = read_chat(d / "seed_tasks.jsonl")
    return (
        _write_jsonl(OUT / "data" / "si-train.jsonl", [{"messages": m} for m in seed[:-25]]),
        _write_jsonl(OUT / "data" / "si-val.jsonl", [{"messages": m} for m in seed[-25:]]),
        d / "user_oriented_instructions.jsonl",
    )


def alpaca_zh():
    """Chinese instructions (LLaMA-Factory's Alpaca demo, 1,000 records): train on the first
    800, val the next 100, test the last 100."""
    rows = json.loads((SHARED / "alpaca-demo" / "alpaca_zh_demo.json").read_text("utf-8"))
    return (
        _write_jsonl(OUT / "data" / "zh-train.jsonl", rows[:800]),
        _write_jsonl(OUT / "data" / "zh-val.jsonl", rows[800:900]),
        _write_jsonl(OUT / "data" / "zh-test.jsonl", rows[900:]),
    )


def dialogsum():
    """DialogSum has no train file here: train on dev (400), val (100), test on test's
    summary1 (the first of its three references)."""
    d = SHARED / "dialogsum"
    dev = [json.loads(line) for line in _lines(d / "dialogsum.dev.jsonl")]
    test = [json.loads(line) for line in _lines(d / "dialogsum.test.jsonl")]

    def pick(rows):
        return [
            {"dialogue": r["dialogue"], "summary": r.get("summary") or r["summary1"]} for r in rows
        ]

    return (
        _write_jsonl(OUT / "data" / "ds-train.jsonl", pick(dev[:400])),
        _write_jsonl(OUT / "data" / "ds-val.jsonl", pick(dev[400:])),
        _write_jsonl(OUT / "data" / "ds-test.jsonl", pick(test)),
    )


def multi30k():
    """English -> German; test = test_2016_flickr."""
    d = SHARED / "multi30k"

    def pairs(split, name):
        en, de = _lines(d / f"{split}.en.gz"), _lines(d / f"{split}.de.gz")
        rows = [
            {"prompt": f"Translate to German: {e}", "response": g}
            for e, g in zip(en, de, strict=True)
        ]
        return _write_jsonl(OUT / "data" / f"mt-{name}.jsonl", rows)

    return pairs("train", "train"), pairs("val", "val"), pairs("test_2016_flickr", "test")


# -- tasks ---------------------------------------------------------------------------------

# objective, data, per-model settings over SETTINGS, eval limit (0 = the whole test split);
# SmolLM2 takes the long examples (dialogues, instructions) in batches of 4, so that a step
# stays near a few seconds on a CPU
LONG = {"smollm2": dict(batch_size=4, max_steps=40)}
TASKS = {
    "sst2": ("classify", sst2, {}, 0),
    "trec": ("classify", trec, {}, 0),
    "wnut17": ("tag", wnut17, {}, 0),
    "ud-upos": ("tag", ud_ewt, {}, 1000),
    "self-instruct": ("sft", self_instruct, LONG, 100),
    "alpaca-zh": ("sft", alpaca_zh, LONG, 100),
    "dialogsum": ("sft", dialogsum, LONG, 50),
    "multi30k": ("sft", multi30k, {}, 100),
}
SETTINGS = {
    # the 2M-parameter Shakespeare model: full fine-tuning, a high learning rate
    "here": dict(max_steps=300, batch_size=32, lr=1e-3, warmup_steps=20, peft=PeftConfig()),
    # SmolLM2-135M: LoRA r=16 on every linear layer, the usual LoRA learning rate; few steps,
    # as a 2-core CPU trains it at ~200 tokens/s
    "smollm2": dict(
        max_steps=50,
        batch_size=16,
        lr=1e-3,
        warmup_steps=10,
        peft=PeftConfig(method="lora", r=16, alpha=32),
    ),
}


def baseline(objective: str, train: Path, test: Path, limit: int) -> dict:
    """Majority class / most frequent tag per word-less guess ("O" or the commonest tag) /
    the prompt's text copied as the answer."""
    if objective == "classify":
        gold = [label for _, label in read_classification(test)[: limit or None]]
        common = collections.Counter(label for _, label in read_classification(train)).most_common(
            1
        )[0][0]
        return classification_metrics(gold, [common] * len(gold))
    if objective == "tag":
        sentences = read_tagged(test)[: limit or None]
        counts = collections.Counter(t for _, tags in read_tagged(train) for t in tags)
        common = counts.most_common(1)[0][0]
        return tagging_metrics([t for _, t in sentences], [[common] * len(t) for _, t in sentences])
    conversations = read_chat(test)[: limit or None]
    refs = [c[-1]["content"] for c in conversations]
    copies = [
        c[-2]["content"]
        .removeprefix("Translate to German: ")
        .removeprefix("Summarize this dialogue:\n")
        for c in conversations
    ]
    return generation_metrics(copies, refs)


def zero_shot(model: str, name: str) -> dict:
    """The instruct model as it ships, on a generation task: what fine-tuning adds to."""
    objective, data, _, limit = TASKS[name]
    limit = SMOKE["test_limit"] or limit
    if objective != "sft":
        raise ValueError(f"{model} scores generation tasks only, not {objective}")
    train, _, test = data()
    start = time.perf_counter()
    scores, _ = eval_generate(load(MODELS[model]), test, limit, max_new_tokens=48)
    record = {"model": model, "task": name, "objective": objective, "steps": 0, "train_seconds": 0}
    record |= {"eval_seconds": round(time.perf_counter() - start, 1), "test": scores}
    record |= {"test_limit": limit, "baseline": baseline(objective, train, test, limit)}
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def run_task(model: str, name: str) -> dict:
    if model == "smollm2-zero-shot":
        return zero_shot(model, name)
    objective, data, extra, limit = TASKS[name]
    limit = SMOKE["test_limit"] or limit
    train, val, test = data()
    out = OUT / model / name
    settings = {"eval_batches": 8, **SETTINGS[model], **extra.get(model, {}), **SMOKE["settings"]}
    config = FinetuneConfig(
        objective=objective,
        init_from=MODELS[model],
        data=str(train),
        val_data=str(val),
        out_dir=str(out),
        eval_every=0,
        threads=SMOKE["threads"],
        tensorboard=False,
        progress=False,
        **settings,
    )
    start = time.perf_counter()
    result = finetune(config, overwrite=True)
    train_s = time.perf_counter() - start
    print(f"{model}/{name}: {describe(result)}", flush=True)
    lm = load(result.train.checkpoint)
    start = time.perf_counter()
    if objective == "classify":
        scores = eval_classify(lm, test, limit)
    elif objective == "tag":
        scores = eval_tag(lm, test, limit)
    else:
        scores, replies = eval_generate(lm, test, limit, max_new_tokens=48)
        _write_jsonl(out / "replies.jsonl", [{"reply": r} for r in replies])
    record = {
        "model": model,
        "task": name,
        "objective": objective,
        "settings": {
            k: (v.to_dict() if isinstance(v, PeftConfig) else v) for k, v in settings.items()
        },
        "steps": result.train.steps,
        "train_seconds": round(train_s, 1),
        "eval_seconds": round(time.perf_counter() - start, 1),
        "val_loss": result.train.val_loss,
        "test": scores,
        "test_limit": limit,
        "baseline": baseline(objective, train, test, limit),
    }
    with open(OUT / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


# the headline metric of each task (test split), as its papers report it
HEADLINE = {
    "sst2": ("accuracy", 100),
    "trec": ("accuracy", 100),
    "wnut17": ("entity_f1", 100),
    "ud-upos": ("token_accuracy", 100),
    "self-instruct": ("rougeL", 1),
    "alpaca-zh": ("rougeL", 1),
    "dialogsum": ("rougeL", 1),
    "multi30k": ("bleu", 1),
}


def table(path: Path | None = None) -> str:
    """A markdown table of the latest run of each (model, task) in results.jsonl."""
    path = path or OUT / "results.jsonl"
    latest = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        latest[r["model"], r["task"]] = r
    rows = ["| task | model | metric (test) | score | baseline | steps | fine-tune s | test s |"]
    rows.append("|---|---|---|---|---|---|---|---|")
    for task, (metric, scale) in HEADLINE.items():
        for model in MODELS:
            r = latest.get((model, task))
            if r is None:
                continue
            if "error" in r:
                rows.append(f"| {task} | {model} | — | not run: {r['error']} | | | | |")
                continue
            limit = f" (first {r['test_limit']})" if r["test_limit"] else ""
            rows.append(
                f"| {task} | {model} | {metric}{limit} | **{scale * r['test'][metric]:.1f}** | "
                f"{scale * r['baseline'][metric]:.1f} | {r['steps']} | {r['train_seconds']:.0f} | "
                f"{r['eval_seconds']:.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS))
    parser.add_argument("--only", nargs="*", choices=list(TASKS), help="run only these tasks")
    parser.add_argument("--table", action="store_true", help="print results.jsonl as markdown")
    parser.add_argument("--out", type=Path, default=OUT, help="results and converted data")
    parser.add_argument("--here", help="the `here` model (default: make demo's checkpoint)")
    parser.add_argument("--max-steps", type=int, help="a smoke run: this many steps per task")
    parser.add_argument("--test-limit", type=int, help="a smoke run: score this many examples")
    args = parser.parse_args()
    OUT = args.out
    MODELS["here"] = args.here or MODELS["here"]
    if args.max_steps:
        # a smoke run: a batch of 2, one of them for the val loss and metrics
        SMOKE["settings"] = {
            "max_steps": args.max_steps,
            "warmup_steps": 0,
            "batch_size": 2,
            "eval_batches": 1,
        }
    SMOKE["test_limit"] = args.test_limit or 0
    if args.max_steps or args.test_limit:
        SMOKE["threads"] = torch.get_num_threads()
    if args.table:
        print(table())
        return
    if args.model is None:
        parser.error("--model is required (or --table)")
    if not SHARED.is_dir():
        sys.exit(f"{SHARED} is missing: these results need the shared data sets")
    torch.set_num_threads(SMOKE["threads"])
    for name in args.only or TASKS:
        try:
            run_task(args.model, name)
        except ValueError as e:  # e.g. no example fits a small model's context: say so, go on
            print(f"{args.model}/{name}: FAILED: {e}", flush=True)
            with open(OUT / "results.jsonl", "a") as f:
                f.write(json.dumps({"model": args.model, "task": name, "error": str(e)}) + "\n")


if __name__ == "__main__":
    main()
