"""Shared fixtures: tiny randomly initialised models with a locally built tokenizer (no network).

Every fixture is session-scoped and returns the path of a folder that ``from_pretrained`` loads:

- ``tiny_tokenizer_path``: a word-level ``PreTrainedTokenizerFast`` (~100 tokens, ``<eos>``, ``<pad>``);
- ``tiny_lm_path``: a Llama-family causal LM (like SmolLM2) with that tokenizer;
- ``tiny_gpt2_path``: a GPT-2 causal LM with that tokenizer;
- ``tiny_classifier_path``: a 2-label DistilBERT sequence classifier with that tokenizer;
- ``tiny_lm_other_vocab_path``: a Llama causal LM whose vocabulary is 7 tokens larger.

``tiny_prompts`` is a short list of prompts of different lengths in the tiny vocabulary.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# The suite's system temp dir: a folder of its own (one per user, like pytest's own), so that what
# the code under test leaves in "the system temp dir" can be checked (``_nothing_left_in_tmp``).
# pytest's basetemp is made inside it; subprocesses inherit it through TMPDIR.
SUITE_TMP = Path(tempfile.gettempdir()) / f"lmgym-kl-tests-{os.getuid()}"
SUITE_TMP.mkdir(mode=0o700, exist_ok=True)
os.environ["TMPDIR"] = str(SUITE_TMP)
tempfile.tempdir = str(SUITE_TMP)

# Test models are tiny: one intra-op thread is fastest, and immune to contention on a busy machine
# (with two cores shared, idle-spinning worker threads made tiny forwards 100x slower).
torch.set_num_threads(1)

WORDS = (
    "the a an this that it is was were be film movie story plot actor actors acting director scene "
    "scenes i you he she they we my his her and but or so because of to in on at with for as by "
    "not very really too quite just good great bad terrible awful wonderful love loved hate hated "
    "boring funny sad beautiful best worst ever never all one two time end ending character "
    "characters music script watch watched see saw review like liked"
).split() + list(".,!?'\"-:;()")

TINY_PROMPTS = [
    "this movie was",
    "i loved the acting and the music but the plot",
    "the worst film i have ever seen , the script",
    "a",
    "the director of this story never",
]


# pytest's own basetemps, and torch's compile cache (meant to outlive a session, like pytest's)
_KEPT_PREFIXES = ("pytest-of-", "torchinductor_")


def _temp_entries() -> set[str]:
    return {name for name in os.listdir(SUITE_TMP) if not name.startswith(_KEPT_PREFIXES)}


@pytest.fixture(scope="session", autouse=True)
def _nothing_left_in_tmp():
    """The suite leaves nothing in the system temp dir outside pytest's own tmp paths (an SB3
    default logger's ``SB3-<timestamp>`` folder, a temporary file not cleaned up, ...)."""
    before = _temp_entries()
    yield
    left = sorted(_temp_entries() - before)
    assert not left, f"the test suite left {len(left)} entries in the system temp dir {SUITE_TMP}: {left[:10]}"


def _build_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", model_max_length=128
    )
    tokenizer.save_pretrained(path)
    return tokenizer


def _llama(vocab_size: int, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.3,  # large weights: logits vary a lot with tokens and positions
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return LlamaForCausalLM(config)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    _build_tokenizer(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


@pytest.fixture(scope="session")
def tiny_lm_path(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(0)
    return _save(_llama(len(tiny_tokenizer), tiny_tokenizer), tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_lm_other_vocab_path(tmp_path_factory, tiny_tokenizer):
    torch.manual_seed(1)
    model = _llama(len(tiny_tokenizer) + 7, tiny_tokenizer)
    return _save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_llama_other_vocab"))


@pytest.fixture(scope="session")
def tiny_gpt2_path(tmp_path_factory, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=len(tiny_tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=0.3,
        bos_token_id=tiny_tokenizer.eos_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    return _save(GPT2LMHeadModel(config), tiny_tokenizer, tmp_path_factory.mktemp("tiny_gpt2"))


@pytest.fixture(scope="session")
def tiny_classifier_path(tmp_path_factory, tiny_tokenizer):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(3)
    config = DistilBertConfig(
        vocab_size=len(tiny_tokenizer),
        dim=32,
        n_layers=1,
        n_heads=2,
        hidden_dim=64,
        max_position_embeddings=128,
        num_labels=2,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    model = DistilBertForSequenceClassification(config)
    return _save(model, tiny_tokenizer, tmp_path_factory.mktemp("tiny_classifier"))


@pytest.fixture(scope="session")
def tiny_prompts():
    return list(TINY_PROMPTS)
