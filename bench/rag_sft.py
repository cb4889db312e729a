"""Teaching SmolLM2 to answer from its sources: retrieval-augmented SFT on SQuAD, for
docs/RESULTS.md.

bench/rag_eval.py found SmolLM2-135M-Instruct answering in sentences: with the gold paragraph
among its 3 retrieved sources 88.5% of the time, its retrieved F1 was 10.2 against 4.9
closed-book. This bench fine-tunes it to answer briefly from sources, then asks the same
questions again:

- evaluated: bench/rag_eval.py's questions (random.Random(0).sample of SQuAD dev's 10,570),
  the first --questions of its 500;
- trained on: --chats other SQuAD dev questions, none of those 500 and none on a paragraph an
  evaluated question asks about, shuffled with seed 1, each answered with its first gold answer
  (a short span). `finetune sft retrieval=INDEX` puts each question's 3 best-retrieved
  paragraphs into the prompt as `serve --retrieval` does, the right one or not.

Every step is the documented command, run as a subprocess and printed, everything written under
--out (runs/rag-sft): index the 2,067 paragraphs, fine-tune (LoRA r=16), then `eval rag` of the
tuned model with its retrieved sources and closed-book. The full run takes about 25 minutes on
a 2-core AMD EPYC, most of it the 60 training steps.

    .venv/bin/python bench/rag_sft.py [--steps 60] [--chats 400] [--questions 200] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from rag_eval import ROOT, gptkit, squad_questions, write_jsonl


def data(out: Path, chats: int, questions: int, smoke: bool) -> tuple[Path, Path, Path]:
    """(paragraphs to index, training chats, evaluated QA rows)."""
    docs, qas, subset = squad_questions(500)
    evaluated = subset[:questions]
    held = {q["question"] for q in subset}
    asked = {q["doc_id"] for q in evaluated}
    pool = [q for q in qas if q["question"] not in held and q["doc_id"] not in asked]
    random.Random(1).shuffle(pool)
    train = pool[:chats]
    if smoke:
        evaluated, train = evaluated[:3], train[:8]
        kept = {q["doc_id"] for q in evaluated + train}
        docs = [d for d in docs if d["id"] in kept]
    chat_rows = [
        {"messages": [{"role": "user", "content": q["question"]},
                      {"role": "assistant", "content": q["answers"][0]}]}
        for q in train
    ]  # fmt: skip
    return (
        write_jsonl(out / "squad-docs.jsonl", docs),
        write_jsonl(out / "train.jsonl", chat_rows),
        write_jsonl(out / "qa.jsonl", evaluated),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps of 4 chats")
    parser.add_argument("--chats", type=int, default=400, help="training questions")
    parser.add_argument("--questions", type=int, default=200, help="evaluated questions")
    parser.add_argument(
        "--smoke", action="store_true", help="a few rows, 1 step of 2, 8 tokens (tests)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "rag-sft")
    args = parser.parse_args()
    out = args.out.resolve()
    docs, train, qa = data(out, args.chats, args.questions, args.smoke)
    index, run = out / "squad-idx", out / "sft"
    gptkit("index", str(docs), "--out", str(index), "--overwrite")
    # smoke: 1 step of 2 chats (each holds 3 retrieved paragraphs, ~500 tokens: the step is
    # the smoke's most costly pass; 2 still pads a batch) and 8-token answers, as rag_eval's
    steps = "1" if args.smoke else str(args.steps)
    batch, tokens = ("2", "8") if args.smoke else ("4", "24")
    gptkit("finetune", "sft", "--model", "smollm2-135m-instruct", "--data", str(train),
           f"retrieval={index}", "peft.method=lora", "peft.r=16", "peft.alpha=32", "lr=1e-3",
           f"batch_size={batch}", f"max_steps={steps}", "eval_every=0", "progress=false",
           f"out_dir={run}", "--overwrite")  # fmt: skip
    scores = {}
    for mode in ("retrieved", "closed-book"):
        saved = out / f"{mode}.json"
        gptkit("eval", "rag", "--model", str(run / "checkpoint"), "--index", str(index),
               "--data", str(qa), "--mode", mode, "-k", "3", "--max-new-tokens", tokens,
               "--out", str(saved))  # fmt: skip
        scores[mode] = json.loads(saved.read_text())
    print(f"SmolLM2-135M-Instruct after {steps} steps of retrieval-augmented SFT, SQuAD dev")
    print("| mode | EM | F1 | contains |\n|---|---|---|---|")
    for mode, r in scores.items():
        print(f"| {mode} | {r['exact_match']:.1f} | {r['f1']:.1f} | {r['contains']:.1f} |")
    gain = scores["retrieved"]["f1"] - scores["closed-book"]["f1"]
    verdict = "met" if gain >= 20 else "NOT met"
    print(f"retrieved F1 - closed-book F1 = {gain:+.1f} (target +20: {verdict})")


if __name__ == "__main__":
    main()
