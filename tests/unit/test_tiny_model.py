import json
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from lpreg_core.rewards import ExactMatchVerifier
from lpreg_core.tasks import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MAX_PROMPT_TOKENS, make_problems

MODEL_DIR = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "model"
MAX_MODEL_BYTES = 8 * 1024 * 1024


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR).eval()


def test_shipped_files():
    names = {path.name for path in MODEL_DIR.iterdir()}
    expected = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}
    assert expected | {"tokenizer_config.json"} <= names
    assert sum(path.stat().st_size for path in MODEL_DIR.iterdir()) < MAX_MODEL_BYTES


def test_config_matches_tokenizer(model, tokenizer):
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3


def test_generation_config_samples_the_full_distribution():
    config = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert config["do_sample"] is True
    assert config["temperature"] == 1.0
    assert config["top_p"] == 1.0
    assert config.get("top_k", 0) == 0
    assert config["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS


def test_tokenizer_is_character_level_and_round_trips(tokenizer):
    for prompt in ["23+58=", "0-0=", "99*99=", "1 2\n3"]:
        ids = tokenizer(prompt)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert len(ids) == len(prompt) + 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    answer_ids = tokenizer("81", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(answer_ids + [tokenizer.eos_token_id], skip_special_tokens=True) == "81"


def test_raw_tokenizer_file_agrees_with_auto_tokenizer(tokenizer):
    raw = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    for problem in make_problems("eval", 20, seed=0):
        ids = tokenizer(problem.prompt)["input_ids"]
        assert raw.encode(problem.prompt).ids == ids
        assert len(ids) <= DEFAULT_MAX_PROMPT_TOKENS
        assert raw.decode(ids, skip_special_tokens=True) == problem.prompt


def test_greedy_generation_gives_parseable_answers(model, tokenizer):
    problems = make_problems("eval", 32, seed=0)
    batch = tokenizer(
        [p.prompt for p in problems], padding=True, padding_side="left", return_tensors="pt"
    )
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
    new_tokens = out[:, batch["input_ids"].shape[1] :]
    completions = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    assert all(re.fullmatch(r"\d+", text) for text in completions), completions
    assert all(tokenizer.eos_token_id in row.tolist() for row in new_tokens)
    verifier = ExactMatchVerifier()
    accuracy = sum(
        verifier.score(text, p.answer) for text, p in zip(completions, problems, strict=True)
    ) / len(problems)
    # the shipped warm start is partly right (about half greedy), not a random init
    assert accuracy >= 0.2


def test_sampled_generation_ends_within_budget(model, tokenizer):
    problem = make_problems("eval", 1, seed=0)[0]
    batch = tokenizer([problem.prompt], return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, num_return_sequences=16)
    completions = tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert out.shape[1] - batch["input_ids"].shape[1] <= DEFAULT_MAX_NEW_TOKENS
    assert all(len(text) < DEFAULT_MAX_NEW_TOKENS for text in completions)
    assert all(set(text) <= set("0123456789+-*= \n") for text in completions)
