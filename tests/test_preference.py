"""Preference tuning: pairs read from every shape, DPO's loss and rewards equal to TRL's on the
same batch, reward models and DPO learning a toy preference through the one Trainer (LoRA and
full, resumed exactly), the eval and API around them, and their errors."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

import processes
import pytest
import torch
from conftest import save_finetune_base, tiny_chat_lm

from gptkit.api import load
from gptkit.chat_template import CHATML
from gptkit.checkpoint import load_checkpoint, save_checkpoint
from gptkit.config import ConfigError
from gptkit.examples import collate
from gptkit.finetune import finetune
from gptkit.preference import dpo_loss, reply_logps, score_pairs
from gptkit.preference_data import encode_pair, lm_rows, read_pairs
from gptkit.surgery import fit_chat_template, set_head
from gptkit.taskdata import DataError
from gptkit.train_config import FinetuneConfig, PeftConfig

POS, NEG = ["good", "great", "fine", "nice"], ["bad", "awful", "poor", "sad"]
FAST = dict(lr=3e-3, batch_size=8, eval_every=0, progress=False, tensorboard=False, threads=1)
PREFERENCE = Path(__file__).parents[1] / "../shared/data/preference"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """The tiny base model and 120 pairs in which a kind word is preferred to an unkind one."""
    d = tmp_path_factory.mktemp("preference")
    save_finetune_base(d / "base")
    rng = random.Random(0)
    pairs = [
        {
            "prompt": f"say {rng.choice('abc')}",
            "chosen": rng.choice(POS),
            "rejected": rng.choice(NEG),
        }
        for _ in range(120)
    ]
    (d / "pairs.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    return d


def config(data: Path, objective: str, out: str, **settings) -> FinetuneConfig:
    return FinetuneConfig(
        objective=objective,
        init_from=str(data / "base"),
        data=str(data / "pairs.jsonl"),
        out_dir=str(data / out),
        template="chatml",
        **{**FAST, **settings},
    )


# -- reading pairs -------------------------------------------------------------------------


def test_every_pair_shape_reads_to_the_same_pair(tmp_path):
    user = {"role": "user", "content": "hi"}
    shapes = [
        {"prompt": "hi", "chosen": "hello", "rejected": "go away"},
        {
            "conversations": [{"from": "human", "value": "hi"}],
            "chosen": {"from": "gpt", "value": "hello"},
            "rejected": {"from": "gpt", "value": "go away"},
        },
        {
            "prompt": [user],
            "chosen": [{"role": "assistant", "content": "hello"}],
            "rejected": [{"role": "assistant", "content": "go away"}],
        },
        {
            "chosen": [user, {"role": "assistant", "content": "hello"}],
            "rejected": [user, {"role": "assistant", "content": "go away"}],
        },
    ]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(s) for s in shapes))
    pairs = read_pairs(str(tmp_path / "pairs.jsonl"))
    assert len(pairs) == 4
    assert all(p == pairs[0] for p in pairs)
    assert (pairs[0].prompt, pairs[0].chosen, pairs[0].rejected) == ([user], "hello", "go away")


@pytest.mark.parametrize(
    "record,message",
    [
        ({"prompt": "hi", "chosen": "a"}, "not a preference pair"),
        (
            {"conversations": [{"from": "alien", "value": "x"}], "chosen": "a", "rejected": "b"},
            "alien",
        ),
        (
            {"prompt": [{"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "end with the user",
        ),
        (
            {"prompt": "hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "one assistant reply",
        ),
        (
            {
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": [
                    {"role": "user", "content": "c"},
                    {"role": "assistant", "content": "d"},
                ],
            },
            "last reply",
        ),
    ],
)
def test_a_bad_pair_is_one_line_naming_the_record(tmp_path, record, message):
    (tmp_path / "bad.jsonl").write_text(
        json.dumps({"prompt": "x", "chosen": "a", "rejected": "b"}) + "\n" + json.dumps(record)
    )
    with pytest.raises(DataError, match=message) as e:
        read_pairs(str(tmp_path / "bad.jsonl"))
    assert "line 2" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(
    not PREFERENCE.is_dir(), reason=f"{PREFERENCE} (the shared preference pairs) is absent"
)
@pytest.mark.parametrize("name", ["dpo_en_demo.json", "dpo_zh_demo.json"])
def test_the_shared_pairs_read_whole(name):
    pairs = read_pairs(str(PREFERENCE / name))
    records = json.loads((PREFERENCE / name).read_text())
    assert len(pairs) == len(records) == 300
    for p, r in zip(pairs, records, strict=True):  # every turn kept, system prompts too
        assert [m["content"] for m in p.prompt] == [t["value"] for t in r["conversations"]]
        assert (p.chosen, p.rejected) == (r["chosen"]["value"], r["rejected"]["value"])
    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    for p, r in zip(pairs, records, strict=True):
        assert [m["role"] for m in p.prompt] == [roles[t["from"]] for t in r["conversations"]]


def write_pairs(path: Path, records: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def test_the_prompt_is_encoded_once_and_long_rows_are_cut(tmp_path):
    lm = tiny_chat_lm()
    record = {"prompt": "hello there " * 20, "chosen": "zq " * 40, "rejected": "thanks"}
    (pair,) = read_pairs(write_pairs(tmp_path / "p.jsonl", [record]))
    e = encode_pair(lm.tokenizer, pair, CHATML, max_length=64, max_prompt_length=24)
    assert len(e.prompt) == 24  # the prompt keeps its end: the turn being answered
    assert lm.tokenizer.decode(e.prompt).endswith("<|im_start|>assistant\n")
    assert len(e.prompt) + len(e.chosen) == 64 and len(e.rejected) < 40
    chosen, _ = lm_rows(e)
    assert [t for t in chosen.targets if t != -100] == e.chosen and len(chosen.ids) == 63


# -- the loss against TRL's ----------------------------------------------------------------


@pytest.mark.reference("trl")
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_loss_and_rewards_equal_trls_on_the_same_batch(tmp_path, loss_type):
    """TRL's DPOTrainer tokenizes the same conversational pairs with the same chat template
    and computes its loss and rewards with transformers' model; gptkit's come from its own
    encoding and model, loaded from the same weights."""
    transformers = pytest.importorskip("transformers")
    trl = pytest.importorskip("trl", reason="TRL is the reference")
    datasets = pytest.importorskip("datasets")
    from gptkit.convert import export_hf
    from gptkit.loading import load_pretrained

    lm = tiny_chat_lm(block_size=128)
    policy = lm.model
    reference = tiny_chat_lm(block_size=128).model
    with torch.no_grad():  # the policy moved away from the reference, as after some training
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=lm.tokenizer._tok, pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    hf_tok.chat_template = CHATML
    for model, name in ((policy, "policy"), (reference, "ref")):
        export_hf(model, tmp_path / name)
        hf_tok.save_pretrained(tmp_path / name)
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    reply = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731
    records = [
        {
            "prompt": user("how are you?"),
            "chosen": reply("I am fine, thanks."),
            "rejected": reply("hello"),
        },
        {
            "prompt": user("hello there"),
            "chosen": reply("hello, how are you?"),
            "rejected": reply("I am."),
        },
        {
            "prompt": user("thanks"),
            "chosen": reply("fine"),
            "rejected": reply("there, there, how are you? I am fine"),
        },
    ]
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.1,
        loss_type=[loss_type],
        max_length=None,
        report_to=[],
        use_cpu=True,
        bf16=False,  # else accelerate runs TRL's reference model (only) under bf16 autocast
        per_device_train_batch_size=len(records),
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained
    trainer = trl.DPOTrainer(
        model=hf(tmp_path / "policy"),
        ref_model=hf(tmp_path / "ref"),
        args=args,
        train_dataset=datasets.Dataset.from_list(records),
        processing_class=hf_tok,
    )
    examples = [trainer.train_dataset[i] for i in range(len(records))]
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        want = trainer._compute_loss(trainer.model.eval(), batch, False).item()
    metrics = {k: v[-1] for k, v in trainer._metrics["eval"].items()}  # eval: model.eval()

    loaded = load_pretrained(tmp_path / "policy")
    ours_policy, tokenizer = loaded.model, loaded.tokenizer
    ours_ref = load_pretrained(tmp_path / "ref").model.eval()
    pairs = read_pairs(write_pairs(tmp_path / "pairs.jsonl", records))
    encoded = [encode_pair(tokenizer, p, tokenizer.chat_template, 128, 0) for p in pairs]
    for e, theirs in zip(encoded, examples, strict=True):  # the same tokens, split the same way
        assert (e.prompt, e.chosen, e.rejected) == (
            theirs["prompt_ids"],
            theirs["chosen_ids"],
            theirs["rejected_ids"],
        )
    rows = [lm_rows(e) for e in encoded]
    x, y = collate([c for c, _ in rows] + [r for _, r in rows], 0)
    with torch.no_grad():
        logps, n, _ = reply_logps(ours_policy.eval(), x, y)
        ref, _, _ = reply_logps(ours_ref, x, y)
    loss, rewards = dpo_loss(logps, ref, n, 0.1, loss_type)
    chosen, rejected = rewards.chunk(2)
    logps_chosen, logps_rejected = logps.chunk(2)
    got = {
        "loss": loss.mean().item(),
        "rewards/chosen": chosen.mean().item(),
        "rewards/rejected": rejected.mean().item(),
        "rewards/margins": (chosen - rejected).mean().item(),
        "logps/chosen": logps_chosen.mean().item(),
        "logps/rejected": logps_rejected.mean().item(),
    }
    print(f"\n{loss_type}: ours {got}\nTRL: loss {want}, {metrics}")
    assert abs(got["loss"] - want) < 1e-5
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert abs(got[key] - metrics[key]) < 1e-5, key
    for key in ("logps/chosen", "logps/rejected"):  # sums over ~10 tokens: relative
        assert abs(got[key] - metrics[key]) < 1e-5 * abs(metrics[key]), key
    assert abs(got["rewards/margins"]) > 1e-3  # the policy differs from its reference


# -- training through the one Trainer ------------------------------------------------------


@pytest.mark.parametrize(
    "objective,method", [("dpo", "none"), ("dpo", "lora"), ("reward", "none"), ("reward", "lora")]
)
def test_a_toy_preference_is_learned(data, objective, method):
    """Kind words are preferred: on the held-out pairs, the untouched model has no such
    preference, the trained reward model or DPO policy has it on every pair."""
    base = load(data / "base")
    _, tokenizer = fit_chat_template(base.model, base.tokenizer, "chatml")  # as training does
    pairs = read_pairs(str(data / "pairs.jsonl"))[:24]
    before = score_pairs(base.model, tokenizer, pairs)  # mean log-prob per reply token
    # dpo + lora runs by epochs (3 of 108 pairs, 41 steps of 8): the reference must be
    # precomputed for the pairs the steps the epochs make draw
    steps = dict(epochs=3.0) if (objective, method) == ("dpo", "lora") else dict(max_steps=30)
    settings = dict(beta=0.5, peft=PeftConfig(method=method), **steps)
    result = finetune(config(data, objective, f"{objective}-{method}", **settings), overwrite=True)

    after = result.metrics
    print(f"\n{objective} {method}: before {before['accuracy']:.2f}, after {after}")
    assert before["accuracy"] < 0.8  # not there before training
    assert after["accuracy"] == 1.0 and after["margin"] > 0.5 and after["n"] == 12
    assert result.train.steps == (41 if "epochs" in steps else 30)
    saved = json.loads((data / f"{objective}-{method}" / "val_metrics.json").read_text())
    assert saved["accuracy"] == 1.0
    logged = [
        json.loads(line) for line in (data / f"{objective}-{method}" / "metrics.jsonl").open()
    ]
    train = [m for m in logged if "rewards/accuracies" in m]
    assert train and train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    if objective == "dpo":  # the KL to the reference: zero at the start, grown by training
        assert 0 < after["kl_per_token"] < 5 and "logps/chosen" in train[-1]
    else:
        assert load(data / f"{objective}-{method}" / "checkpoint").config.labels == ["reward"]


@pytest.mark.parametrize(
    "method", ["dora", "adalora", "ia3", "adapter", "prefix", "prompt", "lora+int8"]
)
@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_every_peft_method_trains_a_preference_objective(data, objective, method):
    """The other methods (LoRA learns above) train DPO and reward models, and their adapters
    put back onto the base model are the fine-tuned model."""
    name, _, quantize = method.partition("+")
    peft = PeftConfig(method=name, prefix_length=4, quantize=quantize or "none", tinit=1)
    out = f"{objective}-{method}"
    result = finetune(config(data, objective, out, max_steps=3, beta=0.5, peft=peft))
    assert result.train.steps == 3 and math.isfinite(result.train.val_loss)
    full = load(result.train.checkpoint)
    on_base = load(data / "base", adapter=data / out / "adapter")
    x = torch.tensor([full.tokenizer.encode("<|im_start|>user\nhi")])
    torch.testing.assert_close(on_base.model(x), full.model(x))


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_a_resumed_run_equals_an_unbroken_one(data, objective):
    lora = PeftConfig(method="lora", dropout=0.1)  # dropout: the RNG state must resume too
    whole = finetune(
        config(data, objective, f"whole-{objective}", max_steps=6, decay_steps=6, peft=lora),
        overwrite=True,
    )
    part = config(data, objective, f"parts-{objective}", max_steps=3, decay_steps=6, peft=lora)
    finetune(part, overwrite=True)
    finetune(dataclasses.replace(part, max_steps=6), resume=True)
    a = load_checkpoint(whole.train.checkpoint)[0].state_dict()
    b = load_checkpoint(data / f"parts-{objective}" / "checkpoint")[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the CLI, the API, errors --------------------------------------------------------------


def gptkit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptkit", *args], capture_output=True, text=True)


def test_cli_trains_and_scores_a_policy_and_a_reward_model(data, tmp_path):
    pairs = str(data / "pairs.jsonl")
    common = ["--model", str(data / "base"), "--data", pairs, "template=chatml", "max_steps=20"]
    common += ["lr=3e-3", "threads=1", "progress=false", "tensorboard=false"]
    runs = {}
    for objective in ("dpo", "reward"):
        runs[objective] = tmp_path / objective
        out = f"out_dir={json.dumps(str(runs[objective]))}"
        done = gptkit("finetune", objective, *common, out, "peft.method=lora", "beta=0.5")
        assert done.returncode == 0, done.stderr
        assert "fine-tuned: 20 steps" in done.stdout and "accuracy 1.0000" in done.stdout
    policy = str(runs["dpo"] / "checkpoint")
    done = gptkit(
        "eval",
        "preference",
        "--model",
        policy,
        "--ref",
        str(data / "base"),
        "--data",
        pairs,
        "--beta",
        "0.5",
    )
    assert done.returncode == 0, done.stderr
    assert "implicit reward" in done.stdout and "kl_per_token" in done.stdout
    accuracy = re.search(r"accuracy\s*\|?\s*([\d.]+)", done.stdout)
    assert accuracy and float(accuracy.group(1)) > 0.95
    done = gptkit(
        "eval", "preference", "--model", str(runs["reward"] / "checkpoint"), "--data", pairs
    )
    assert done.returncode == 0, done.stderr
    assert "reward" in done.stdout
    rm = load(runs["reward"] / "checkpoint")
    user = [{"role": "user", "content": "say b"}]
    kind, unkind = rm.reward(
        [user + [{"role": "assistant", "content": w}] for w in ("great", "awful")]
    )
    assert kind > unkind


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(loss_type="kto"), "loss_type='kto'"),
        (dict(beta=0.0), "beta must be > 0"),
        (dict(max_length=64, max_prompt_length=64), "max_prompt_length < max_length"),
    ],
)
def test_bad_settings_are_refused(data, settings, message):
    with pytest.raises(ConfigError, match=message):
        config(data, "dpo", "bad", **settings).validate()


def test_a_file_of_other_records_is_one_line(data, tmp_path):
    (tmp_path / "sft.jsonl").write_text(json.dumps({"prompt": "hi", "response": "hello"}))
    out = f"out_dir={json.dumps(str(tmp_path / 'run'))}"
    model_data = ["--model", str(data / "base"), "--data", str(tmp_path / "sft.jsonl")]
    done = gptkit("finetune", "dpo", *model_data, out, "loss_type=hinge")
    assert done.returncode != 0 and "not a preference pair" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_classifier_is_neither_policy_nor_reward_model(data, tmp_path):
    base = load(data / "base")
    save_checkpoint(
        tmp_path / "cls", set_head(base.model, "classify", ["neg", "pos"]), base.tokenizer
    )
    pairs = ["--data", str(data / "pairs.jsonl")]
    out = f"out_dir={json.dumps(str(tmp_path / 'run'))}"
    done = gptkit("finetune", "dpo", "--model", str(tmp_path / "cls"), *pairs, out)
    assert done.returncode != 0 and "dpo trains a language model" in done.stderr
    done = gptkit("finetune", "reward", "--model", str(tmp_path / "cls"), *pairs, out)
    assert done.returncode != 0 and "not a reward head" in done.stderr
    done = gptkit("eval", "preference", "--model", str(tmp_path / "cls"), *pairs)
    assert done.returncode != 0 and "language or reward model" in done.stderr


def test_torchrun_two_processes_train_dpo_like_one(data, tmp_path):
    """dpo + LoRA under DDP (gloo, 2 CPU processes, one micro-batch each) ends with the weights
    of one process running both micro-batches."""
    args = ["dpo", "--model", str(data / "base"), "--data", str(data / "pairs.jsonl")]
    args += ["max_steps=3", "grad_accum=2", "batch_size=4", "peft.method=lora", "threads=1"]
    args += ["template=chatml", "progress=false", "tensorboard=false", "eval_every=0"]
    one = gptkit("finetune", *args, f"out_dir={json.dumps(str(tmp_path / 'one'))}")
    assert one.returncode == 0, one.stderr
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = f"out_dir={json.dumps(str(tmp_path / 'two'))}"
    two = processes.run([*torchrun, "-m", "gptkit", "finetune", *args, out], timeout=600)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("fine-tuned: 3 steps") == 1
    a = load_checkpoint(tmp_path / "one" / "checkpoint")[0].state_dict()
    b = load_checkpoint(tmp_path / "two" / "checkpoint")[0].state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_tune_searches_a_dpo_run_by_its_val_loss(data):
    from gptkit.tune import tune

    result = tune(
        config(data, "dpo", "tune", max_steps=2, peft=PeftConfig(method="lora")), trials=2
    )
    assert len(result.trials) == 2 and result.best_metrics["score"] == "implicit reward"
    assert result.best_val_loss == min(t["val_loss"] for t in result.trials)
