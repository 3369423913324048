"""PPOKL checkpoints: safetensors + JSON only, an exact continuation, pickles refused, and the
trained policy exported as a Hugging Face folder."""
from __future__ import annotations

import base64
import json
import pickle
import random
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from agents import PPOKL
from agents.state.checkpoint import CheckpointError
from agents.ppo_kl import main
from agents.cli.run_dir import export_policy
from tests.helpers.ppokl import make_env, make_model
from tests.helpers.cli import tiny_run_flags


def _rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _set_rng_states(states) -> None:
    torch.set_rng_state(states[0])
    np.random.set_state(states[1])
    random.setstate(states[2])


def test_checkpoint_is_safetensors_with_json_metadata(tiny_lm_path, tmp_path):
    model = make_model(tiny_lm_path, kl_reward="analytic", analytic_grad=True, kl_coef=0.1)
    model.learn(total_timesteps=model.n_envs * model.n_steps)
    path = tmp_path / "model.safetensors"
    model.save(path)
    assert not zipfile.is_zipfile(path)
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        meta = json.loads(f.metadata()["ppokl"])
    assert "policy.value_head.0.weight" in names and "rng.torch" in names
    assert any(name.startswith("optimizer.") and name.endswith(".exp_avg_sq") for name in names)
    assert meta["counters"]["n_iterations"] == 1 and meta["settings"]["kl_reward"] == "analytic"


def test_a_checkpoint_saved_before_the_sampler_setting_loads_with_its_old_draw(tiny_lm_path, tmp_path):
    model = make_model(tiny_lm_path, kl_reward="k1", kl_coef=0.1)
    assert model.sampler == "inverse-cdf"
    path = tmp_path / "model.safetensors"
    model.save(path)
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
        meta = json.loads(f.metadata()["ppokl"])
    assert meta["settings"].pop("sampler") == "inverse-cdf"
    save_file(tensors, str(path), metadata={"ppokl": json.dumps(meta)})
    assert PPOKL.load(path, env=make_env(tiny_lm_path)).sampler == "multinomial"


def test_resumed_training_is_identical_to_uninterrupted_training(tiny_lm_path, tmp_path):
    """Save after one iteration, train two more; load and train the same two: bit-identical weights,
    optimizer state and beta (adaptive controller), from the restored RNG states and counters."""
    model = make_model(tiny_lm_path, kl_reward="k1", kl_target=0.5, kl_coef=0.2)
    steps = model.n_envs * model.n_steps
    model.learn(total_timesteps=steps)
    model.save(tmp_path / "model.safetensors")
    states = _rng_states()
    model.learn(total_timesteps=2 * steps, reset_num_timesteps=False)

    _set_rng_states(states)  # load must restore them itself: scramble them first
    torch.manual_seed(123)
    loaded = PPOKL.load(tmp_path / "model.safetensors", env=make_env(tiny_lm_path))
    assert (loaded.n_iterations, loaded.num_timesteps) == (1, steps)
    loaded.learn(total_timesteps=2 * steps, reset_num_timesteps=False)
    assert (loaded.n_iterations, loaded.num_timesteps, loaded._n_updates) == (model.n_iterations, model.num_timesteps, model._n_updates)
    assert loaded.kl_controller.value == model.kl_controller.value != 0.2
    for (name, a), b in zip(model.policy.state_dict().items(), loaded.policy.state_dict().values()):
        assert torch.equal(a, b), name
    expected, got = model.policy.optimizer.state_dict()["state"], loaded.policy.optimizer.state_dict()["state"]
    assert sorted(expected) == sorted(got)
    for index, state in expected.items():
        assert [key for key in state if not torch.equal(state[key], got[index][key])] == [], index


class _Payload:
    """Unpickling this creates the file ``path`` (a harmless stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def _plant_sb3_zip(path, marker) -> None:
    """An SB3-format zip whose pickled ``data`` entry runs ``_Payload`` when SB3 loads it."""
    serialized = base64.b64encode(pickle.dumps(_Payload(marker))).decode()
    data = {"policy_kwargs": {":type:": "<class 'dict'>", ":serialized:": serialized}}
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("data", json.dumps(data))
        archive.writestr("_stable_baselines3_version", "2.9.2")


def test_pickled_sb3_checkpoint_is_refused_without_running_it(tiny_lm_path, tmp_path):
    from stable_baselines3.common.save_util import load_from_zip_file

    marker = tmp_path / "pwned"
    planted = tmp_path / "control.zip"
    _plant_sb3_zip(planted, marker)
    load_from_zip_file(planted)  # control: SB3's own loader runs the payload
    assert marker.exists()
    marker.unlink()

    planted = tmp_path / "model.safetensors"  # the name does not matter: the content is checked
    _plant_sb3_zip(planted, marker)
    with pytest.raises(CheckpointError, match="pickle"):
        PPOKL.load(planted, env=make_env(tiny_lm_path))
    assert not marker.exists()


def test_cli_resume_refuses_a_planted_pickle_and_keeps_the_run(tiny_lm_path, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "pwned"
    _plant_sb3_zip(out / "checkpoint.safetensors", marker)
    planted = (out / "checkpoint.safetensors").read_bytes()
    assert main(tiny_run_flags(tiny_lm_path, out, 2) + ["--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error:") and "pickle" in err
    assert not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors"]
    assert (out / "checkpoint.safetensors").read_bytes() == planted


@pytest.mark.parametrize("content", [b"not a checkpoint", "safetensors without metadata"])
def test_other_files_are_refused(tiny_lm_path, tmp_path, content):
    path = tmp_path / "model.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        save_file({"x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError):
        PPOKL.load(path, env=make_env(tiny_lm_path))
    with pytest.raises(ValueError, match="env="):
        PPOKL.load(path)


def test_settings_that_are_not_json_must_be_passed_again(tiny_lm_path, tmp_path):
    def schedule(progress_remaining: float) -> float:
        return 1e-3 * progress_remaining

    model = make_model(tiny_lm_path, learning_rate=schedule)
    model.save(tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="learning_rate"):
        PPOKL.load(tmp_path / "model.safetensors", env=make_env(tiny_lm_path))
    loaded = PPOKL.load(tmp_path / "model.safetensors", env=make_env(tiny_lm_path), learning_rate=schedule)
    assert loaded.learning_rate is schedule


def test_policy_export_loads_with_from_pretrained_and_pipeline(tiny_lm_path, tmp_path):
    from transformers import AutoModelForCausalLM, pipeline

    env = make_env(tiny_lm_path)
    model = make_model(tiny_lm_path, env)
    model.learn(total_timesteps=model.n_envs * model.n_steps)
    folder = export_policy(model, env.venv.task.tokenizer, tmp_path)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.bin"))
    exported = AutoModelForCausalLM.from_pretrained(folder)
    for (name, a), b in zip(model.policy.lm.state_dict().items(), exported.state_dict().values()):
        assert torch.equal(a, b), name
    generator = pipeline("text-generation", model=str(folder))
    text = generator("this movie was", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("this movie was") and len(text.split()) > 3
