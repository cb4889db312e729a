"""Fine-tuning on tiny models: each objective learns what it must, every method runs with
every objective, runs resume exactly, and the CLI (finetune, eval, tune, merge) works."""

import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import processes
import pytest
import torch
import torch.nn.functional as F
from conftest import FINETUNE_CHARS, save_finetune_base

from gptkit.api import load
from gptkit.chat_template import CHATML
from gptkit.checkpoint import load_checkpoint
from gptkit.config import ConfigError
from gptkit.evaltasks import eval_classify, eval_generate
from gptkit.examples import IGNORE, chat_example, classification_example, pack, tagging_example
from gptkit.finetune import Distill, finetune, make_task
from gptkit.tokenizer import char_tokenizer
from gptkit.tokenizer_files import load_tokenizer
from gptkit.train_config import FinetuneConfig, PeftConfig
from gptkit.tune import tune

POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
# Short runs on a tiny model, one thread so repeated runs take the same arithmetic path.
FAST = dict(lr=3e-3, batch_size=16, eval_every=0, progress=False, tensorboard=False, threads=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A random tiny-llama base model (char tokenizer) and toy task files."""
    d = tmp_path_factory.mktemp("finetune")
    save_finetune_base(d / "base")
    rng = random.Random(0)
    rows = []
    for _ in range(240):
        label = rng.random() < 0.5
        rows.append(
            {
                "text": f"it was {rng.choice(POS if label else NEG)}",
                "label": "pos" if label else "neg",
            }
        )
    (d / "cls.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    chat = [{"prompt": f"say {w}", "response": f"{w} {w}"} for w in POS + NEG for _ in range(12)]
    (d / "sft.jsonl").write_text("\n".join(json.dumps(r) for r in chat))
    sentences = []
    for _ in range(120):
        words = rng.sample(POS + NEG, 4)
        sentences.append([(w, "B-POS" if w in POS else "O") for w in words])
    write_tagged(d, sentences)
    (d / "text.txt").write_text(" ".join(rng.choice(POS + NEG) for _ in range(4000)))
    return d


def write_tagged(d: Path, sentences: list[list[tuple[str, str]]]) -> None:
    """The tagging data in three shapes: CoNLL (tag.conll), UniversalNER's IOB2 with comment
    lines and an index column (tag.iob2), the same with no tags ("-", tag-untagged.iob2), and
    the tag before the word (tag-swapped.tsv)."""
    conll = ["\n".join(f"{w}\t{t}" for w, t in s) for s in sentences]
    (d / "tag.conll").write_text("\n\n".join(conll) + "\n")
    for name, untagged in (("tag.iob2", False), ("tag-untagged.iob2", True)):
        blocks = []
        for n, s in enumerate(sentences, start=1):
            rows = [f"# sent_id = toy-{n:04d}", f"# text = {' '.join(w for w, _ in s)}"]
            rows += [f"{i}\t{w}\t{'-' if untagged else t}\t-\t-" for i, (w, t) in enumerate(s, 1)]
            blocks.append("\n".join(rows))
        (d / name).write_text("\n\n".join(blocks) + "\n")
    swapped = ["\n".join(f"{t}\t{w}" for w, t in s) for s in sentences]
    (d / "tag-swapped.tsv").write_text("\n\n".join(swapped) + "\n")


def run(data: Path, objective: str, file: str, out: str, **settings):
    config = FinetuneConfig(
        objective=objective,
        init_from=str(data / "base"),
        data=str(data / file),
        out_dir=str(data / out),
        **{**FAST, **settings},
    )
    return finetune(config, overwrite=True)


# -- examples ------------------------------------------------------------------------------


def test_sft_scores_the_assistant_turns_and_nothing_else():
    tok = char_tokenizer(FINETUNE_CHARS, special_tokens=["<|im_start|>", "<|im_end|>"])
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "bye"},
        {"role": "assistant", "content": "ciao"},
    ]
    ex = chat_example(tok, messages, CHATML, block_size=200)
    assert len(ex.ids) == len(ex.targets)
    scored = tok.decode([t for t in ex.targets if t != IGNORE])
    assert scored == "hello<|im_end|>\nciao<|im_end|>\n"  # both replies, each closed
    # the inputs are the whole rendered conversation (but its last token, only a target)
    text = tok.decode(ex.ids)
    assert text.startswith("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi")
    # a context too short for any reply token leaves nothing to learn: no example
    assert chat_example(tok, messages, CHATML, block_size=10) is None


def test_classify_and_tag_examples_put_labels_where_the_model_can_read_them():
    tok = load_tokenizer("gpt2")
    ex = classification_example(tok, "a fine film", 1, block_size=16)
    assert ex.ids[-1] == tok.eos_id and ex.targets == [IGNORE] * (len(ex.ids) - 1) + [1]
    words = ["Hugging", "Face", "rocks"]
    ex = tagging_example(tok, words, [1, 2, 0], block_size=16)
    assert tok.decode(ex.ids) == "Hugging Face rocks"
    assert len(tok.encode("Hugging")) > 1  # a word of several sub-tokens...
    ends = [i for i, t in enumerate(ex.targets) if t != IGNORE]  # ...labelled on its last one
    assert [tok.decode(ex.ids[: i + 1]) for i in ends] == [
        "Hugging",
        "Hugging Face",
        "Hugging Face rocks",
    ]
    assert [ex.targets[i] for i in ends] == [1, 2, 0]
    packed = pack([ex, ex, ex], block_size=5)
    assert all(len(p.ids) <= 5 for p in packed)
    assert [t for p in packed for t in p.ids] == ex.ids * 3


# -- objectives learn ----------------------------------------------------------------------


def test_a_tiny_classifier_beats_chance_and_keeps_its_label_names(data):
    result = run(data, "classify", "cls.jsonl", "cls", max_steps=40)
    assert result.metrics["accuracy"] >= 0.9 and result.metrics["macro_f1"] >= 0.9
    lm = load(result.train.checkpoint)
    assert lm.config.head == "classify" and lm.config.labels == ["neg", "pos"]
    assert eval_classify(lm, data / "cls.jsonl")["accuracy"] >= 0.9


def test_a_tiny_tagger_finds_the_entities(data):
    result = run(data, "tag", "tag.conll", "tag", max_steps=40)
    assert result.metrics["entity_f1"] >= 0.9
    assert load(result.train.checkpoint).config.labels == ["B-POS", "O"]


def test_a_tagger_trains_and_scores_on_universalner_iob2(data):
    """Issue 24: comment lines and the index column of UniversalNER's .iob2 are not words or
    tags; the run learns the real tags and `gptkit eval tag` reports entity scores."""
    result = run(data, "tag", "tag.iob2", "tag-uner", max_steps=40)
    assert load(result.train.checkpoint).config.labels == ["B-POS", "O"]  # not '-' or ids
    assert result.metrics["entity_f1"] >= 0.9
    checkpoint = str(result.train.checkpoint)
    done = gptkit("eval", "tag", "--model", checkpoint, "--data", str(data / "tag.iob2"))
    assert done.returncode == 0, done.stderr
    table = dict(line.split() for line in done.stdout.splitlines()[3:])  # title, header, rule
    assert table["scheme"] == "IOB2" and float(table["entity_f1"]) >= 0.9
    assert {"entity_precision", "entity_recall", "token_accuracy"} <= set(table)
    # The columns can be named: a file with the tag before the word.
    swapped = ["--data", str(data / "tag-swapped.tsv"), "--word-column", "1", "--tag-column", "0"]
    done = gptkit("eval", "tag", "--model", checkpoint, *swapped)
    assert done.returncode == 0, done.stderr
    assert float(dict(line.split() for line in done.stdout.splitlines()[3:])["entity_f1"]) >= 0.9
    # A file without tags is refused, in one line that names the options, not scored.
    done = gptkit("eval", "tag", "--model", checkpoint, "--data", str(data / "tag-untagged.iob2"))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "every tag (column 4) is '-'" in done.stderr and "tag_column=" in done.stderr


def test_finetune_tag_refuses_a_wrong_column_before_training(data, tmp_path):
    done = finetune_cli(data, "tag", "tag-untagged.iob2", tmp_path, "progress=false")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert (
        done.stderr.startswith("gptkit: error: ") and "every tag (column 4) is '-'" in done.stderr
    )
    assert "set word_column= and tag_column=" in done.stderr
    assert not (tmp_path / "checkpoint").exists()  # nothing trained, nothing written
    # word_column= / tag_column= reach the run: the swapped file trains on its real tags.
    settings = ["word_column=1", "tag_column=0", "max_steps=2", "progress=false"]
    done = finetune_cli(data, "tag", "tag-swapped.tsv", tmp_path, *settings)
    assert done.returncode == 0, done.stderr
    assert load(tmp_path / "checkpoint").config.labels == ["B-POS", "O"]


def test_sft_learns_to_answer_and_adds_chatml_to_a_tokenizer_without_it(data):
    result = run(data, "sft", "sft.jsonl", "sft", max_steps=80)
    lm = load(result.train.checkpoint)
    assert {"<|im_start|>", "<|im_end|>"} <= set(lm.tokenizer.special_tokens)
    assert lm.tokenizer.chat_template == CHATML and lm.config.vocab_size == lm.tokenizer.vocab_size
    assert result.train.val_loss < 0.7  # ~4.3 (ln 75) for a model that knows nothing
    scores, replies = eval_generate(lm, data / "sft.jsonl", limit=16, max_new_tokens=12)
    assert scores["exact_match"] >= 50, replies
    assert scores["lang"] == "en" and scores["bleu_tokenize"] == "13a"


def test_lm_finetuning_lowers_the_perplexity_of_domain_text(data):
    base = load(data / "base")
    ids = base.tokenizer.encode((data / "text.txt").read_text()[:3000])
    x = torch.tensor([ids[:64]])
    before = F.cross_entropy(base.model(x)[0, :-1], x[0, 1:]).item()
    result = run(data, "lm", "text.txt", "lm", max_steps=30)
    assert result.train.val_loss < before - 1.0
    assert (data / "lm" / "data" / "meta.json").is_file()  # the text was prepared once


def test_distill_loss_is_the_temperature_scaled_kl_plus_the_hard_loss(data):
    config = FinetuneConfig(
        objective="distill",
        init_from=str(data / "base"),
        data=str(data / "text.txt"),
        teacher=str(data / "base"),
        out_dir=str(data / "d0"),
        temperature=2.0,
        distill_alpha=0.5,
    )
    task = make_task(config)
    assert isinstance(task, Distill)
    student = task.build_model(torch.device("cpu"))
    torch.manual_seed(3)
    with torch.no_grad():
        task.teacher.tok_emb.weight.add_(torch.randn_like(task.teacher.tok_emb.weight))
    x, y = task.train_batch(0, 0)
    loss = task.loss(student, x, y)
    s, t = student(x).flatten(0, 1), task.teacher(x).flatten(0, 1)
    kl = (
        (F.softmax(t / 2, -1) * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1)))
        .sum(-1)
        .mean()
    )
    expected = 0.5 * 4 * kl + 0.5 * F.cross_entropy(s, y.flatten())
    torch.testing.assert_close(loss, expected)


def test_distillation_moves_the_student_toward_the_teacher(data):
    teacher = run(data, "lm", "text.txt", "teacher", max_steps=30).train.checkpoint
    base = load(data / "base").model
    result = run(
        data,
        "distill",
        "text.txt",
        "student",
        max_steps=30,
        teacher=str(teacher),
        distill_on="lm",
        distill_alpha=1.0,
    )
    student, t = load(result.train.checkpoint).model, load(teacher).model
    x = torch.tensor([load(teacher).tokenizer.encode("good bad nice sad awful great fine poor")])

    def kl(model):
        return F.kl_div(
            F.log_softmax(model(x), -1),
            F.log_softmax(t(x), -1),
            log_target=True,
            reduction="batchmean",
        ).item()

    assert kl(student) < 0.5 * kl(base)  # measured: 43.5 -> 10.9


# -- every method with every objective ------------------------------------------------------

OBJECTIVES = [
    ("lm", "text.txt"),
    ("sft", "sft.jsonl"),
    ("classify", "cls.jsonl"),
    ("tag", "tag.conll"),
]


METHODS = ["lora", "dora", "adalora", "ia3", "adapter", "prefix", "prompt", "lora+int8"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("objective,file", OBJECTIVES + [("distill", "cls.jsonl")])
def test_every_method_runs_with_every_objective(data, objective, file, method):
    name, _, quantize = method.partition("+")
    peft = PeftConfig(method=name, prefix_length=4, quantize=quantize or "none", tinit=1)
    settings = dict(max_steps=3, peft=peft)
    if objective == "distill":  # a classifier teacher for a classifier student
        teacher = run(data, "classify", "cls.jsonl", "teacher-cls", max_steps=2).train.checkpoint
        settings |= dict(teacher=str(teacher), distill_on="classify")
    result = run(data, objective, file, f"{objective}-{method}", **settings)
    assert result.train.steps == 3 and math.isfinite(result.train.val_loss)
    # the full checkpoint and the adapter on the base model are the same model
    full = load(result.train.checkpoint)
    on_base = load(data / "base", adapter=result.adapter)
    x = torch.tensor([full.tokenizer.encode("it was good")])
    torch.testing.assert_close(on_base.model(x), full.model(x))
    assert (
        sum(f.stat().st_size for f in result.adapter.glob("*.safetensors"))
        < 0.5 * (data / "base" / "model.safetensors").stat().st_size
    )


@pytest.mark.parametrize(
    "lora",
    [
        PeftConfig(method="lora", dropout=0.1),  # dropout: the RNG state must resume too
        # AdaLoRA: its sensitivity scores, and the ranks they chose, must resume too
        PeftConfig(method="adalora", r=4, target_r=2, tinit=1, tfinal=2, dropout=0.1),
        PeftConfig(method="lora", quantize="int8"),  # int8 base layers load back as they were
    ],
    ids=["lora", "adalora", "lora+int8"],
)
def test_a_resumed_finetune_equals_an_unbroken_one(data, lora):
    # the schedule is fixed by decay_steps, so stopping at step 4 changes nothing but the stop
    out = f"whole-{lora.method}-{lora.quantize}"
    whole = run(data, "classify", "cls.jsonl", out, max_steps=8, decay_steps=8, peft=lora)
    config = FinetuneConfig(
        objective="classify",
        init_from=str(data / "base"),
        data=str(data / "cls.jsonl"),
        out_dir=str(data / f"parts-{lora.method}-{lora.quantize}"),
        max_steps=4,
        decay_steps=8,
        peft=lora,
        **FAST,
    )
    finetune(config, overwrite=True)
    finetune(dataclasses.replace(config, max_steps=8), resume=True)
    a = load_checkpoint(whole.train.checkpoint)[0].state_dict()
    b = load_checkpoint(data / f"parts-{lora.method}-{lora.quantize}" / "checkpoint")[0]
    b = b.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    if lora.method == "adalora":  # the allocator ran: some singular values were cut
        e = [v for k, v in a.items() if k.endswith("lora_E")]
        assert 0 < sum(int((v == 0).sum()) for v in e) < sum(v.numel() for v in e)


def test_epochs_set_the_number_of_steps(data):
    result = run(data, "classify", "cls.jsonl", "epochs", epochs=2.0, batch_size=10)
    assert result.train.steps == math.ceil(2 * 216 / 10)  # 240 examples, 10% held out


# -- errors, CLI, tune ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(data="missing.jsonl"), "missing.jsonl"),
        (dict(label_field="y"), "no field 'y'"),
        (dict(objective="distill"), "needs teacher"),
        (dict(peft=PeftConfig(method="lora", targets=["q_proj"])), "match no linear layer"),
        (dict(model={"preset": "small", "dropout": 0.1}), "do not apply to fine-tuning"),
        (
            dict(peft=PeftConfig(method="adalora", tinit=1)),
            r"tinit \+ peft.tfinal must be < the 1 scheduled",
        ),
        (dict(peft=PeftConfig(method="adalora"), fsdp=True), "FSDP shards them"),
        (dict(peft=PeftConfig(method="prompt", prefix_length=100_000)), "leaves no room"),
    ],
)
def test_bad_settings_are_one_clear_error(data, settings, message):
    base = dict(
        objective="classify",
        init_from=str(data / "base"),
        data=str(data / "cls.jsonl"),
        out_dir=str(data / "bad"),
        max_steps=1,
        **FAST,
    )
    with pytest.raises((ConfigError, ValueError, OSError), match=message):
        finetune(FinetuneConfig(**{**base, **settings}), overwrite=True)


def gptkit(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "gptkit", *args], capture_output=True, text=True, cwd=cwd
    )


def finetune_cli(data: Path, objective: str, file: str, out: Path, *settings: str):
    """`gptkit finetune OBJECTIVE --model base --data FILE out_dir=OUT SETTINGS...`"""
    model_data = ["--model", str(data / "base"), "--data", str(data / file)]
    return gptkit("finetune", objective, *model_data, f"out_dir={json.dumps(str(out))}", *settings)


def test_cli_finetune_eval_and_merge(data, tmp_path):
    out = tmp_path / "run"
    settings = ["max_steps=30", "lr=3e-3", "batch_size=16", "peft.method=lora", "peft.r=4"]
    done = finetune_cli(data, "classify", "cls.jsonl", out, *settings, "progress=false")
    assert done.returncode == 0, done.stderr
    assert "accuracy" in done.stdout and "adapter in" in done.stdout
    results = tmp_path / "eval.json"
    done = gptkit(
        "eval",
        "classify",
        "--model",
        str(data / "base"),
        "--adapter",
        str(out / "adapter"),
        "--data",
        str(data / "cls.jsonl"),
        "--out",
        str(results),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(results.read_text())["accuracy"] >= 0.8
    merged = tmp_path / "merged"
    done = gptkit("merge", "--model", str(out / "checkpoint"), str(merged))
    assert done.returncode == 0, done.stderr
    lora, plain = load(out / "checkpoint"), load(merged)
    assert load_checkpoint(merged)[2]["peft"] is None
    x = torch.tensor([lora.tokenizer.encode("it was nice")])
    torch.testing.assert_close(plain.model(x), lora.model(x), rtol=1e-4, atol=1e-5)


def test_cli_errors_are_one_line(data, tmp_path):
    done = finetune_cli(data, "classify", "cls.jsonl", tmp_path, "label_field=y")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "no field 'y'" in done.stderr
    done = gptkit("finetune", "sft", "--data", "x.jsonl", "learning_rate=1")
    assert done.returncode == 2 and "unknown training config key 'learning_rate'" in done.stderr
    done = gptkit("eval", "tag", "--model", str(data / "base"), "--data", str(data / "tag.conll"))
    assert done.returncode == 2 and "needs a model with a tag head" in done.stderr


def test_tune_searches_and_reports_the_best_trial(data):
    config = FinetuneConfig(
        objective="classify",
        init_from=str(data / "base"),
        data=str(data / "cls.jsonl"),
        out_dir=str(data / "tune"),
        max_steps=4,
        peft=PeftConfig(method="lora"),
        **FAST,
    )
    result = tune(config, trials=3)
    losses = [t["val_loss"] for t in result.trials]
    assert len(losses) == 3 and result.best_val_loss == min(losses)
    assert set(result.best_params) == {"lr", "batch_size", "lora_r"}
    saved = json.loads((data / "tune" / "tune.json").read_text())
    assert saved["best_trial"] == result.best_trial
    assert (data / "tune" / f"trial-{result.best_trial}" / "checkpoint").is_dir()


@pytest.mark.parametrize(
    "objective,file,settings",
    [
        ("sft", "sft.jsonl", ["peft.method=prefix", "peft.prefix_length=4"]),
        ("tag", "tag.conll", ["peft.method=adapter", "peft.adapter_size=8"]),
        ("lm", "text.txt", []),
        ("distill", "text.txt", ["peft.method=lora", "distill_on=lm"]),
    ],
)
def test_cli_runs_every_objective(data, tmp_path, objective, file, settings):
    if objective == "distill":
        settings = [*settings, f"teacher={json.dumps(str(data / 'base'))}"]
    done = finetune_cli(data, objective, file, tmp_path, "max_steps=2", "progress=false", *settings)
    assert done.returncode == 0, done.stderr
    assert "fine-tuned: 2 steps" in done.stdout
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()


def test_cli_eval_choice_and_perplexity(data, tmp_path):
    items = [{"question": f"is {w} good", "choices": ["yes", "no"], "answer": 0} for w in POS]
    (tmp_path / "mc.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    base = ["--model", str(data / "base")]
    done = gptkit("eval", "choice", *base, "--data", str(tmp_path / "mc.jsonl"), "--shots", "1")
    assert done.returncode == 0, done.stderr
    assert "accuracy_norm" in done.stdout and "shots" in done.stdout
    done = gptkit("eval", "perplexity", *base, "--data", str(data / "text.txt"))
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_torchrun_two_processes_fine_tune_like_one(data, tmp_path, method):
    """classify + LoRA under DDP (gloo, 2 CPU processes, one micro-batch each) ends with the
    weights of one process running both micro-batches; only rank 0 reports. AdaLoRA too: its
    penalty joins each rank's synced micro-batch, and its scores read the averaged gradients."""
    args = ["classify", "--model", str(data / "base"), "--data", str(data / "cls.jsonl")]
    args += ["max_steps=4", "grad_accum=2", "batch_size=8", f"peft.method={method}", "threads=1"]
    args += ["peft.tinit=1"] if method == "adalora" else []
    args += ["progress=false", "tensorboard=false"]
    one = gptkit("finetune", *args, f"out_dir={json.dumps(str(tmp_path / 'one'))}")
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    two = processes.run(
        [
            *torchrun,
            "-m",
            "gptkit",
            "finetune",
            *args,
            f"out_dir={json.dumps(str(tmp_path / 'two'))}",
        ],
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("fine-tuned: 4 steps") == 1
    a = load_checkpoint(tmp_path / "one" / "checkpoint")[0].state_dict()
    b = load_checkpoint(tmp_path / "two" / "checkpoint")[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
