"""PPO with exact KL handling for lmgym text environments (SB3-compatible)."""
from agents.algorithm import PPOKL
from agents.policy import CausalLMPolicy
from agents.vec_env import LMGymVecEnv

__all__ = ["PPOKL", "CausalLMPolicy", "LMGymVecEnv"]
