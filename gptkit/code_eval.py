"""`gptkit eval code`: functional correctness of generated code, as HumanEval measures it.

Each problem (HumanEval's JSONL: task_id, prompt, test, entry_point) is completed n times from
its prompt, cut at the stop sequences of the Codex paper's harness. A chat model is asked in its
chat template to complete the function, its reply is started for it with a Python code fence,
and the code up to the closing fence runs after the prompt (redefining the function, as
EvalPlus runs the code of chat models). each completion runs with
the problem's tests in the sandbox (sandbox.py); pass@k is the unbiased estimator of Chen et al.
2021 over the n samples, averaged over problems.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from .chat_template import chat_prompt
from .config import ConfigError
from .sandbox import SANDBOX, Sandbox
from .taskdata import DataError, located_records

if TYPE_CHECKING:
    from .api import LM

# What ends a function body in HumanEval's reference evaluation (Chen et al. 2021, section 2.3)
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
INSTRUCTION = "Complete the following Python function.\n\n```python\n{prompt}```"
FIELDS = ("task_id", "prompt", "test", "entry_point")


def read_problems(path: str | Path) -> list[dict]:
    """HumanEval-shaped problems from a JSONL file (or .jsonl.gz); one line names what is wrong."""
    problems = []
    for where, record in located_records(path):
        missing = [k for k in FIELDS if not isinstance(record.get(k), str)]
        if missing:
            raise DataError(
                f"{where}: a problem needs text fields {', '.join(FIELDS)}; "
                f"missing {', '.join(missing)}"
            )
        problems.append(record)
    return problems


def code_prompt(lm: LM, problem: dict, chat: bool) -> str:
    """What the model continues: the problem's prompt, or with chat, the request to complete
    it in the chat template followed by the start of the reply, a Python code fence."""
    if not chat:
        return problem["prompt"]
    ask = [{"role": "user", "content": INSTRUCTION.format(prompt=problem["prompt"])}]
    return chat_prompt(lm.tokenizer, ask) + "```python\n"


def program(problem: dict, completion: str, chat: bool = False) -> str:
    """The file the sandbox runs: the prompt, the completion (a chat model's whole code on a
    line of its own), the tests, and the check call."""
    code = f"{problem['prompt']}\n{completion}" if chat else problem["prompt"] + completion
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of k samples drawn from n (c of them correct) passes:
    1 - C(n-c, k) / C(n, k), as a product so that large n does not overflow."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check(
    problems: Sequence[dict],
    completions: Sequence[Sequence[str]],
    sandbox: Sandbox = SANDBOX,
    workers: int = 2,
    chat: bool = False,
) -> list[list[dict]]:
    """Run every completion of every problem with its tests, `workers` at a time; per problem,
    per completion: {passed, status, output}."""
    jobs = [(i, program(p, c, chat)) for i, p in enumerate(problems) for c in completions[i]]
    with ThreadPoolExecutor(workers) as pool:
        outcomes = list(pool.map(lambda job: sandbox.run(job[1]), jobs))
    results: list[list[dict]] = [[] for _ in problems]
    for (i, _), outcome in zip(jobs, outcomes, strict=True):
        results[i].append(vars(outcome))
    return results


def summarize(results: Sequence[Sequence[dict]], ks: Sequence[int] = (1, 10, 100)) -> dict:
    """pass@k for each k up to the samples per problem, averaged over problems (0-100)."""
    n = min(len(r) for r in results)
    scores = {}
    for k in ks:
        if k <= n:
            per_problem = [pass_at_k(len(r), sum(x["passed"] for x in r), k) for r in results]
            scores[f"pass@{k}"] = 100 * float(np.mean(per_problem))
    return scores


def eval_code(
    lm: LM,
    path: str | Path,
    limit: int = 0,
    n: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 384,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 8,
    sandbox: Sandbox = SANDBOX,
    progress: bool = False,
    chat: bool | None = None,
) -> tuple[dict, list[dict]]:
    """pass@k of the model's completions (greedy when temperature is 0, then n must be 1),
    and one record per problem with its completions and outcomes. chat: prompt through the
    chat template (default: when the model has one)."""
    if n < 1 or (temperature == 0 and n > 1):
        raise ConfigError(
            f"-n {n} with temperature {temperature}: greedy decoding gives one answer per "
            "problem; sample (e.g. --temperature 0.8) for n > 1"
        )
    problems = read_problems(path)[: limit or None]
    chat = bool(lm.tokenizer.chat_template) if chat is None else chat
    prompts = [code_prompt(lm, p, chat) for p in problems]
    room = lm.model.context - max_new_tokens
    for p, prompt in zip(problems, prompts, strict=True):
        if len(lm.tokenizer.encode(prompt)) > room:
            raise ConfigError(
                f"{p['task_id']}'s prompt and {max_new_tokens} new tokens do not fit the "
                f"model's context of {lm.model.context}; lower --max-new-tokens"
            )
    stop = ["```"] if chat else STOP
    sampling = dict(max_new_tokens=max_new_tokens, stop=stop, temperature=temperature)
    completions: list[list[str]] = []
    with tqdm(total=len(prompts), unit="problem", desc="generate", disable=not progress) as bar:
        if temperature == 0:  # one answer each: prompts decoded together, batch_size at a time
            for start in range(0, len(prompts), batch_size):
                batch = prompts[start : start + batch_size]
                completions += [[c] for c in lm.generate(batch, **sampling)]
                bar.update(len(batch))
        else:  # n samples of each prompt decoded together; a seed per problem
            sampling |= dict(top_p=top_p, num_return_sequences=n)
            for i, prompt in enumerate(prompts):
                completions.append(lm.generate(prompt, seed=seed + i, **sampling))
                bar.update()
    results = check(problems, completions, sandbox, chat=chat)
    scores = {
        **summarize(results),
        "problems": len(problems),
        "samples_per_problem": n,
        "temperature": temperature,
        "chat_template": chat,
        "sandbox_network": sandbox.isolation["network"],
        "sandbox_user": sandbox.isolation["user"],
    }
    records = [
        {"task_id": p["task_id"], "completions": c, "results": r}
        for p, c, r in zip(problems, completions, results, strict=True)
    ]
    return scores, records


def cmd_eval_code(args: argparse.Namespace) -> None:
    """`gptkit eval code`: load the model, score it, print the table, save every sample."""
    from .api import load
    from .evaluate import format_table, save_results

    if len(args.data) != 1:
        raise ConfigError(f"eval code reads one problems file, got {len(args.data)}")
    lm = load(args.model, device=args.device, adapter=args.adapter, quantize=args.quantize)
    scores, records = eval_code(
        lm,
        args.data[0],
        args.limit,
        n=args.n,
        temperature=args.temperature,
        max_new_tokens=args.max_new_tokens or 384,
        progress=True,
        chat=False if args.no_chat_template else None,
    )
    print(format_table(scores, title=f"code: {args.data[0]}"))
    if args.out:
        save_results({"task": "code", "model": args.model, **scores, "samples": records}, args.out)
        print(f"saved to {args.out} (with every completion and its outcome)")
