"""The `gptkit` command: each subcommand works, and each user error is one line + exit 2."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TEXT

from gptkit.checkpoint import save_checkpoint
from gptkit.cli import main
from gptkit.config import preset
from gptkit.model import GPT
from gptkit.tokenizer import char_tokenizer
from gptkit.tokenizer_files import load_tokenizer


@pytest.fixture(scope="module")
def ckpt(char_checkpoint):
    return char_checkpoint


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("gptkit: error: "), err
    assert message in err


def test_presets_lists_every_preset_with_counts(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0
    assert "124,439,808" in out and "smollm2-135m" in out and "gpt3-175b" in out
    code, out, _ = run(capsys, "presets", "gpt1")
    assert json.loads(out)["prenorm"] is False


def test_tokenizer_train(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT * 200)
    code, out, _ = run(
        capsys,
        "tokenizer",
        "train",
        "--input",
        corpus,
        "--vocab-size",
        300,
        "--out",
        tmp_path / "tok",
    )
    assert code == 0 and "saved to" in out

    tok = load_tokenizer(tmp_path / "tok")
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert_one_line_error(
        capsys,
        ["tokenizer", "train", "--input", tmp_path / "missing.txt", "--out", tmp_path / "t2"],
        "missing.txt",
    )


def test_generate_greedy_stream_and_sequences(capsys, ckpt):
    base = [
        "generate",
        "--model",
        ckpt,
        "--prompt",
        "the ",
        "--max-new-tokens",
        12,
        "--device",
        "cpu",
    ]
    code, greedy, _ = run(capsys, *base, "--temperature", 0)
    assert code == 0 and greedy.startswith("the ")
    code, streamed, _ = run(capsys, *base, "--temperature", 0, "--stream")
    assert code == 0 and streamed == greedy
    code, out, _ = run(capsys, *base, "--num-return-sequences", 2, "--seed", 1)
    assert code == 0 and out.count("--- sequence") == 2
    code, out, _ = run(capsys, *base, "--num-beams", 3, "--temperature", 0)
    assert code == 0 and out.startswith("the ")


def test_generate_takes_every_sampling_option_and_prints_logprobs(capsys, ckpt):
    from gptkit.api import load

    lm = load(ckpt, device="cpu")
    greedy = lm.complete("the ", max_new_tokens=8, temperature=0)[0].ids
    argv = ["generate", "--model", ckpt, "--prompt", "the ", "--device", "cpu"]
    argv += ["--max-new-tokens", 8, "--temperature", 0, "--logprobs", 2]
    argv += ["--logit-bias", f"{greedy[0]}=-100", "--stop-id", greedy[1]]
    code, out, _ = run(capsys, *argv)
    expected = lm.complete(
        "the ",
        max_new_tokens=8,
        temperature=0,
        logprobs=2,
        logit_bias={greedy[0]: -100.0},
        stop_ids=[greedy[1]],
    )[0]
    lines = out.splitlines()
    assert code == 0 and lines[0] == "the " + expected.text
    assert len(lines) == 1 + len(expected.ids)  # a line per token: logprob, token, the top 2
    assert [float(line.split()[0]) for line in lines[1:]] == pytest.approx(
        expected.logprobs, abs=1e-4
    )
    for flags in (["--min-p", 0.1], ["--frequency-penalty", 1.0, "--presence-penalty", 0.5]):
        code, out, _ = run(capsys, "generate", "--model", ckpt, "--prompt", "the ", *flags)
        assert code == 0 and out.startswith("the ")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--top-p", "0"], "top_p must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["--temperature", "-0.5"], "temperature must be >= 0"),
        (["--prompt", "x" * 40], "the prompt has 40 tokens but the model's context is 32"),
        (["--min-p", "2"], "min_p must be in [0, 1]"),
        (["--logprobs", "99"], "logprobs must be in [0, 20]"),
        (["--logit-bias", "x"], "'x' is not ID=BIAS"),
    ],
)
def test_generate_bad_values_are_one_line(capsys, ckpt, flags, message):
    argv = ["generate", "--model", ckpt, "--prompt", "the ", "--device", "cpu", *flags]
    assert_one_line_error(capsys, argv, message)


def test_bad_devices_are_one_line(capsys, ckpt):
    base = ["generate", "--model", ckpt, "--prompt", "the "]
    assert_one_line_error(capsys, [*base, "--device", "gpu"], "unknown device 'gpu'")
    if not torch.cuda.is_available():
        assert_one_line_error(capsys, [*base, "--device", "cuda"], "no CUDA GPU is available")


def test_bad_models_are_one_line(capsys, ckpt, tmp_path):
    assert_one_line_error(capsys, ["presets", "gpt5"], "unknown preset 'gpt5'")
    assert_one_line_error(
        capsys, ["generate", "--model", tmp_path / "nope", "--prompt", "a"], "no such directory"
    )
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in ckpt.iterdir():
        if f.is_file():
            data = f.read_bytes()
            (broken / f.name).write_bytes(
                data[: len(data) // 2] if f.suffix == ".safetensors" else data
            )
    (broken / "tokenizer").symlink_to(ckpt / "tokenizer")
    assert_one_line_error(
        capsys, ["generate", "--model", broken, "--prompt", "a"], "model.safetensors cannot be read"
    )
    wide = tmp_path / "wide"
    torch.manual_seed(0)
    model = GPT(preset("tiny", vocab_size=10, block_size=32))
    save_checkpoint(wide, model, char_tokenizer(TEXT))
    assert_one_line_error(
        capsys, ["generate", "--model", wide, "--prompt", "a"], "the model's vocabulary has only 10"
    )


def test_convert_hf_round_trip(capsys, ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    code, _, _ = run(capsys, "convert", ckpt, tmp_path / "hf", "--to", "hf")
    assert code == 0
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    eos = load_tokenizer(ckpt / "tokenizer").eos_id
    assert eos is not None and ref.config.eos_token_id == eos
    code, _, _ = run(capsys, "convert", tmp_path / "hf", tmp_path / "back")
    assert code == 0
    from gptkit.checkpoint import load_checkpoint

    model, tok, _ = load_checkpoint(tmp_path / "back")
    idx = torch.tensor([tok.encode("the lazy dog")])
    torch.testing.assert_close(model(idx), ref(idx).logits, atol=1e-4, rtol=0)


def test_console_entry_point_runs_as_a_process(ckpt):
    result = subprocess.run(
        [sys.executable, "-m", "gptkit", "generate", "--model", str(ckpt), "--prompt", "x" * 40],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("gptkit: error: the prompt has 40 tokens")


def test_prepare_writes_shards_and_reports(capsys, tmp_path):
    from gptkit.shards import read_shard

    char_tokenizer(TEXT, special_tokens=["<|endoftext|>"]).save(tmp_path / "tok")
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(TEXT * (i + 1))
    argv = ["prepare", docs, "--out", tmp_path / "data", "--tokenizer", tmp_path / "tok"]
    code, out, _ = run(capsys, *argv, "--val-fraction", 0.3, "--workers", 1)
    assert code == 0 and "train tokens" in out and "MB/s" in out
    total = sum(len(read_shard(p)) for p in (tmp_path / "data").glob("*.bin"))
    assert total == len(TEXT) * (1 + 2 + 3 + 4) + 4  # every character plus one EOT per document
    assert_one_line_error(
        capsys, ["prepare", tmp_path / "nope.txt", "--out", tmp_path / "d2"], "nope.txt"
    )


def test_damaged_hugging_face_directories_are_one_line(capsys, tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    (hf / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_one_line_error(capsys, ["convert", hf, tmp_path / "o1"], "cannot read the weights")
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors.index.json").write_text("{}")
    assert_one_line_error(capsys, ["convert", hf, tmp_path / "o2"], "has no weight_map")
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 0}))
    assert_one_line_error(capsys, ["convert", hf, tmp_path / "o3"], "n_head must be positive")
    cfg = {"model_type": "llama", "hidden_size": 8, "num_attention_heads": 3}
    (hf / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(capsys, ["convert", hf, tmp_path / "o4"], "n_embd=8 is not divisible")


def test_a_tokenizer_config_that_is_not_an_object_is_one_line(capsys, tmp_path):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer_config.json").write_text("[1, 2]")
    argv = ["prepare", tmp_path, "--out", tmp_path / "d", "--tokenizer", tmp_path / "tok"]
    assert_one_line_error(capsys, argv, "must hold a JSON object")
