"""An SB3 ``VecEnv`` view of lmgym's batched Gymnasium vector env.

SB3 expects same-step autoreset: a finished sub-env is reset inside ``step``, the returned obs
starts its new episode and the last obs of the old one is in ``info["terminal_observation"]``.
The lmgym vector env does exactly this when built with ``autoreset_mode=SAME_STEP``; this
adapter only converts Gymnasium's dict-of-arrays infos into SB3's list of per-env dicts and adds
Monitor-style ``info["episode"]`` records so SB3's ``rollout/ep_rew_mean`` works.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

FINAL_KEYS = ("ref_logprob", "sentiment", "prompt", "continuation")


class LMGymVecEnv(VecEnv):
    """Wraps an lmgym ``IMDBContinuationVectorEnv`` (SAME_STEP autoreset) as an SB3 VecEnv.

    Args:
        vector_env: an lmgym vector env built with ``autoreset_mode=AutoresetMode.SAME_STEP``.

    Raises:
        ValueError: the env uses another autoreset mode.
    """

    def __init__(self, vector_env: VectorEnv):
        mode = vector_env.metadata.get("autoreset_mode")
        if mode not in (AutoresetMode.SAME_STEP, AutoresetMode.SAME_STEP.value):
            raise ValueError(f"LMGymVecEnv needs a vector env with autoreset_mode=SAME_STEP, got {mode!r}")
        self.venv = vector_env
        super().__init__(vector_env.num_envs, vector_env.single_observation_space, vector_env.single_action_space)
        self.max_new_tokens = vector_env.max_new_tokens
        self._actions: np.ndarray | None = None
        self.current_ref_logits: np.ndarray | None = None  # [N, V] pi_ref logits at the current obs
        self._episode_lengths = np.zeros(self.num_envs, dtype=np.int64)
        self._t0 = time.time()

    @property
    def step_ref_logits(self) -> bool:
        """Whether each step's info carries pi_ref's logits (else the agent scores pi_ref itself)."""
        return self.venv.step_ref_logits

    @property
    def reference_model(self) -> Any:
        """The env's pi_ref (an agent's default reference)."""
        return self.venv.reference_model

    @property
    def tokenizer(self) -> Any:
        """The tokenizer whose ids are the actions."""
        return self.venv.tokenizer

    @property
    def masks_actions(self) -> bool:
        """Whether the env's ``action_masks()`` restricts the actions (lmgym's ``mask_top_k`` / ``mask_top_p``)."""
        return bool(getattr(self.venv, "masks_actions", False))

    def set_reference_model(self, model: Any) -> None:
        """Make ``model`` the env's pi_ref (``IMDBContinuationVectorEnv.set_reference_model``)."""
        self.venv.set_reference_model(model)

    def reset(self) -> VecEnvObs:
        seed = self._seeds[0] if self._seeds and self._seeds[0] is not None else None
        options = self._options[0] if self._options and self._options[0] else None
        obs, info = self.venv.reset(seed=seed, options=options)
        self.current_ref_logits = info.get("ref_logits")  # None for an env without per-step ref logits
        self.reset_infos = [self._ref_info(info, i) for i in range(self.num_envs)]
        self._episode_lengths[:] = 0
        self._reset_seeds()
        self._reset_options()
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions).reshape(self.num_envs)

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, info = self.venv.step(self._actions)
        dones = np.logical_or(terminated, truncated)
        self.current_ref_logits = info.get("ref_logits")
        self._episode_lengths += 1
        infos: list[dict[str, Any]] = []
        for i in range(self.num_envs):
            env_info = self._ref_info(info, i)
            if dones[i]:
                final = info["final_info"]
                env_info.update({key: final[key][i] for key in FINAL_KEYS if key in final})
                env_info["terminal_observation"] = info["final_obs"][i]
                env_info["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                env_info["episode"] = {
                    "r": float(rewards[i]),
                    "l": int(self._episode_lengths[i]),
                    "t": round(time.time() - self._t0, 6),
                }
                self._episode_lengths[i] = 0
            elif "ref_logprob" in info:
                env_info["ref_logprob"] = info["ref_logprob"][i]
            infos.append(env_info)
        return obs, rewards.astype(np.float32), dones, infos

    @staticmethod
    def _ref_info(info: dict[str, Any], i: int) -> dict[str, Any]:
        return {"ref_logits": info["ref_logits"][i]} if "ref_logits" in info else {}

    def close(self) -> None:
        self.venv.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.venv, attr_name)
        return [value for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self.venv, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """The batched env's method once; ``action_masks`` (bool [N, V]) is split into sub-env rows,
        so sb3-contrib's ``get_action_masks`` stacks them back to [N, V]."""
        result = getattr(self.venv, method_name)(*method_args, **method_kwargs)
        if method_name == "action_masks":
            return [result[i] for i in self._get_indices(indices)]
        return [result for _ in self._get_indices(indices)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        return [False for _ in self._get_indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [None for _ in range(self.num_envs)]
