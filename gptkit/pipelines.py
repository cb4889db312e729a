"""transformers-style pipelines over a loaded model: the same task names, inputs and output
shapes, so code written for `transformers.pipeline` runs on gptkit.

    text-generation       [{"generated_text"}]            any language model
    text-classification   [{"label", "score"}]            a classify head (finetune classify)
    token-classification  [{"entity_group", "score", "word", "start", "end"}]   a tag head
    feature-extraction    [[[float] * n_embd] * tokens]   any model: final hidden states
    summarization         [{"summary_text"}]              an instruction-tuned LM, by prompt
    translation(_xx_to_yy) [{"translation_text"}]         an instruction-tuned LM, by prompt
    question-answering    {"answer", "score", "start", "end"}   an instruction-tuned LM, by prompt

The last three are prompts to a chat model (SmolLM2-135M-Instruct works), decoded greedily;
the prompts are PROMPTS below, shown in full so a user can judge and change them. A
question-answering answer is generated, not extracted: start/end locate it in the context
when it appears there (else None), and its score is the mean token probability.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .api import LM, load
from .chat_template import chat_prompt, turn_stops
from .predict import needs_head

PROMPTS = {
    "summarization": "Summarize the following text in one or two sentences.\n\n{text}",
    "translation": (
        "Translate the following text from {src} to {tgt}. Reply with the translation only."
        "\n\n{text}"
    ),
    "question-answering": (
        "Read the context and answer the question with a short phrase copied from the "
        "context, nothing else.\n\nContext: {context}\n\nQuestion: {question}"
    ),
}
LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "zh": "Chinese"}


def _many(inputs: str | list[str], one) -> Any:
    """one(text) for a string; [one(text) for each] for a list (transformers' convention)."""
    return [one(x) for x in inputs] if isinstance(inputs, list) else one(inputs)


class Pipeline:
    def __init__(self, lm: LM, task: str):
        self.lm, self.task = lm, task


class TextGenerationPipeline(Pipeline):
    def __call__(
        self,
        text: str | list[str],
        max_length: int | None = None,
        return_full_text: bool = True,
        **sampling,
    ):
        def one(prompt: str) -> list[dict[str, str]]:
            options = dict(sampling)
            if max_length is not None:  # transformers counts the prompt in max_length
                options["max_new_tokens"] = max(0, max_length - len(self.lm.prompt_ids(prompt)))
            prefix = prompt if return_full_text else ""
            return [{"generated_text": prefix + c} for c in self.lm.generate(prompt, **options)]

        return _many(text, one)


class TextClassificationPipeline(Pipeline):
    def __call__(self, text: str | list[str], top_k: int | None = 1, batch_size: int = 32):
        """top_k=1: [{"label", "score"}] per text; top_k=None: every label, best first.
        A classifier of several fields gives one entry per field, with its "field"."""
        needs_head(self.lm.model, "classify", "text-classification")
        texts = [text] if isinstance(text, str) else list(text)
        results = self.lm.classify(texts, top_k=top_k, batch_size=batch_size)
        several = len(self.lm.config.label_groups()) > 1

        def entries(result: dict[str, Any], field: str | None) -> list[dict[str, Any]]:
            named = {"field": field} if field else {}
            best_first = sorted(result["probs"].items(), key=lambda kv: -kv[1])
            return [{**named, "label": k, "score": p} for k, p in best_first]

        rows = [
            [e for f, r in result.items() for e in entries(r, f)]
            if several
            else entries(result, None)
            for result in results
        ]
        if top_k == 1 and not several:  # transformers: one dict per text, in a list
            return [row[0] for row in rows]
        return rows if isinstance(text, list) else rows[0]


class TokenClassificationPipeline(Pipeline):
    def __call__(self, text: str | list[str], batch_size: int = 32):
        needs_head(self.lm.model, "tag", "token-classification")
        texts = [text] if isinstance(text, str) else list(text)
        found = self.lm.tag(texts, batch_size=batch_size)
        return found if isinstance(text, list) else found[0]


class FeatureExtractionPipeline(Pipeline):
    def __call__(self, text: str | list[str]):
        """[1, tokens, n_embd] nested lists per text: the final hidden states."""

        def one(t: str) -> list[list[list[float]]]:
            return [self.lm.features(t).tolist()]

        return _many(text, one)


class PromptPipeline(Pipeline):
    """A task done by prompting a chat model (see PROMPTS), greedy unless told otherwise."""

    def __init__(self, lm: LM, task: str, src: str = "en", tgt: str = "fr"):
        super().__init__(lm, task)
        self.languages = {"src": LANGUAGES.get(src, src), "tgt": LANGUAGES.get(tgt, tgt)}

    def answer(self, max_new_tokens: int, **fields: str):
        prompt = PROMPTS[self.task].format(**self.languages, **fields)
        tok = self.lm.tokenizer
        text = chat_prompt(tok, [{"role": "user", "content": prompt}])
        options = dict(temperature=0.0, max_new_tokens=max_new_tokens, logprobs=0)
        (c,) = self.lm.complete(text, skip_special=True, stop=turn_stops(tok), **options)
        return c.text.strip(), c.logprobs

    def __call__(self, *args, max_new_tokens: int = 64, **kwargs):
        if self.task == "question-answering":
            question = kwargs.pop("question", args[0] if args else None)
            context = kwargs.pop("context", args[1] if len(args) > 1 else None)
            if question is None or context is None:
                raise ValueError("question-answering needs question= and context=")
            answer, logprobs = self.answer(max_new_tokens, question=question, context=context)
            at = context.lower().find(answer.lower()) if answer else -1
            score = math.exp(sum(logprobs) / len(logprobs)) if logprobs else 0.0
            start, end = (at, at + len(answer)) if at >= 0 else (None, None)
            return {"answer": answer, "score": score, "start": start, "end": end}
        key = "summary_text" if self.task == "summarization" else "translation_text"

        def one(text: str) -> list[dict[str, str]]:
            return [{key: self.answer(max_new_tokens, text=text)[0]}]

        return _many(args[0] if args else kwargs.pop("text"), one)


PIPELINES = {
    "text-generation": TextGenerationPipeline,
    "text-classification": TextClassificationPipeline,
    "sentiment-analysis": TextClassificationPipeline,  # transformers' alias
    "token-classification": TokenClassificationPipeline,
    "ner": TokenClassificationPipeline,  # transformers' alias
    "feature-extraction": FeatureExtractionPipeline,
    "summarization": PromptPipeline,
    "translation": PromptPipeline,
    "question-answering": PromptPipeline,
}


def pipeline(task: str, model: str | Path | LM, device: str | None = None) -> Pipeline:
    """The pipeline for `task` (a name of PIPELINES, or translation_xx_to_yy) on a model or
    anything `gptkit.load` reads."""
    lm = model if isinstance(model, LM) else load(model, device=device)
    if task.startswith("translation_") and "_to_" in task:
        src, _, tgt = task.removeprefix("translation_").partition("_to_")
        return PromptPipeline(lm, "translation", src, tgt)
    if task not in PIPELINES:
        raise ValueError(f"unsupported pipeline task {task!r}; gptkit offers {sorted(PIPELINES)}")
    return PIPELINES[task](lm, task)
