"""The sled command: help, errors as one line with exit status 2, real runs on SmolLM2, and
instruct models asked through their chat template (tiny models built here, no hub)."""
import subprocess
import sys

import pytest
import torch

import sled_ext
from sled_ext.cli import main
from sled_ext.hub import pull
from tiny_models import chat_tokenizer, tiny_chat_model


def sled(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "sled_ext.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_one_line_error(result, message):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert message in result.stderr


def test_help_lists_the_commands():
    result = sled("--help")
    assert result.returncode == 0
    for command in ("compare", "generate", "score", "models", "step"):
        assert command in result.stdout


def test_unknown_method_and_bad_layers_are_usage_errors():
    assert_one_line_error(sled("generate", "--method", "beam"), "invalid choice: 'beam'")
    assert_one_line_error(sled("generate", "--layers", "1,x"), "comma-separated ints")


def test_a_bad_model_path_is_one_line(tmp_path):
    result = sled("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert_one_line_error(result, "sled: error:")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def smollm2():
    return str(pull("smollm2-135m"))


def test_impossible_settings_are_one_line(smollm2):
    assert_one_line_error(sled("generate", "--model", smollm2, "--evolution-scale", "10000000"),
                          "evolution_scale (k) must be in [1, V] = [1, 49152]")
    assert_one_line_error(sled("score", "--model", smollm2, "--prompt", "a",
                               "--continuation", "b", "--layers", "99"),
                          "premature layers must be in [0, 29]")


def test_compare_and_score_run(smollm2):
    result = sled("compare", "--model", smollm2, "--max-new-tokens", "6",
                  "--prompt", "Q: What is the capital of France?\nA:")
    assert result.returncode == 0, result.stderr
    assert "greedy" in result.stdout and "sled" in result.stdout
    result = sled("score", "--model", smollm2, "--prompt", "Q: What is the capital of France?\nA:",
                  "--continuation", " Paris", "--continuation", " Berlin")
    assert result.returncode == 0, result.stderr
    assert "' Paris'" in result.stdout and "' Berlin'" in result.stdout


QUESTION = "Question: What is the capital of France?\nAnswer:"


def _save(model, folder):
    model.save_pretrained(folder)
    chat_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny instruct-style model folder: a chat template, <|im_end|> ends the turn."""
    model = tiny_chat_model(seed=0)
    return model, _save(model, tmp_path_factory.mktemp("chat"))


def _expected_reply(model, ids):
    """What transformers' greedy generate() gives with the CLI's defaults (8 tokens here)."""
    tokenizer = chat_tokenizer()
    out = model.generate(ids, do_sample=False, max_new_tokens=8, tokenizer=tokenizer,
                         stop_strings=["\nQ:"], pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_generate_asks_through_the_chat_template_unless_raw(chat_model, capsys):
    model, folder = chat_model
    tokenizer = chat_tokenizer()
    as_chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}],
                                            add_generation_prompt=True, return_dict=True,
                                            return_tensors="pt")["input_ids"]
    chat_reply = _expected_reply(model, as_chat)
    raw_reply = _expected_reply(model, tokenizer(QUESTION, return_tensors="pt").input_ids)
    assert chat_reply and raw_reply and chat_reply != raw_reply  # the two prompts tell apart
    args = ["generate", "--model", folder, "--method", "greedy", "--max-new-tokens", "8",
            "--prompt", QUESTION]
    assert main(args) == 0  # the reply on a line of its own, then a blank line
    assert capsys.readouterr().out == QUESTION + "\n" + chat_reply + "\n\n"
    assert main(args + ["--raw"]) == 0  # the continuation right after the text
    assert capsys.readouterr().out == QUESTION + raw_reply + "\n\n"


def test_a_generation_without_text_is_reported_on_stderr(tmp_path, capsys):
    model = tiny_chat_model(seed=0)
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy picks token 0, <|im_end|>
    folder = _save(model, tmp_path)
    args = ["generate", "--model", folder, "--method", "greedy", "--prompt", QUESTION]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == QUESTION + "\n\n\n"
    assert captured.err.splitlines()[-1] == ("sled: the generation ended without text (its 1 "
                                             "token(s): '<|im_end|>')")
    assert main(args + ["--raw"]) == 0
    assert capsys.readouterr().err.endswith("; drop --raw to ask through the chat template\n")


def test_score_keeps_its_plain_prompt_with_a_chat_model(chat_model, capsys):
    model, folder = chat_model
    continuations = [" Paris", " Lyon"]
    assert main(["score", "--model", folder, "--prompt", QUESTION, "--continuation",
                 continuations[0], "--continuation", continuations[1]]) == 0
    printed = {line.split(None, 1)[1]: float(line.split()[0])
               for line in capsys.readouterr().out.splitlines()[:2]}
    expected = sled_ext.score(model, chat_tokenizer(), [QUESTION] * 2, continuations)
    assert printed == {repr(c): pytest.approx(s, abs=1e-4) for c, s in zip(continuations, expected)}
