"""The main job until the Trainer lands: train a small GPT from scratch on a generated corpus,
save it as a checkpoint, and sample from it.

The corpus is made by code (no download, no data files): short stories about people, pets
and numbers with a fixed grammar, enough structure for a tiny model to learn in a minute on a
CPU, so the samples show it learned (correct sentence shapes, names, arithmetic-free facts).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import save_checkpoint
from .config import preset
from .model import GPT
from .tokenizer import train_bpe

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Emma", "Finn", "Gus", "Hana", "Ivan", "Jo"]
PETS = ["cat", "dog", "fox", "owl", "hen", "bee"]
PLACES = ["garden", "kitchen", "forest", "library", "harbor", "market"]
COLORS = ["red", "blue", "green", "yellow", "black", "white"]
VERBS = ["found", "painted", "carried", "lost", "fed", "counted"]


def make_corpus(n_stories: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    stories = []
    for _ in range(n_stories):
        who, pet, place = rng.choice(NAMES), rng.choice(PETS), rng.choice(PLACES)
        color, verb, friend = rng.choice(COLORS), rng.choice(VERBS), rng.choice(NAMES)
        n = rng.randint(2, 9)
        stories.append(
            f"{who} went to the {place} with a {color} {pet}. "
            f"There {who} {verb} {n} stones. "
            f"{friend} said: the {pet} is {color}, and the {place} is quiet.\n"
        )
    return "".join(stories)


def run_demo(out_dir: str | Path = "runs/demo", steps: int = 300, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    text = make_corpus(seed=seed)
    tokenizer = train_bpe([text], vocab_size=512)
    data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    config = preset("small", vocab_size=tokenizer.vocab_size, block_size=128)
    model = GPT(config)
    print(
        f"corpus: {len(text):,} chars -> {len(data):,} tokens; model: {model.num_params():,} params"
    )

    batch, lr = 16, 3e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    start = time.perf_counter()
    model.train()
    for step in (bar := tqdm(range(steps), desc="train", unit="step")):
        # linear warmup for 10% of the steps, then cosine decay to 10% of the peak
        warm = max(1, steps // 10)
        scale = (
            (step + 1) / warm
            if step < warm
            else 0.55 + 0.45 * math.cos(math.pi * (step - warm) / (steps - warm))
        )
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(len(data) - config.block_size - 1, (batch,))
        x = torch.stack([data[s : s + config.block_size] for s in starts])
        y = torch.stack([data[s + 1 : s + 1 + config.block_size] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    path = save_checkpoint(Path(out_dir) / "checkpoint", model.eval(), tokenizer)
    print(f"trained {steps} steps in {seconds:.1f}s, final loss {loss.item():.3f}; saved {path}")
    return path
