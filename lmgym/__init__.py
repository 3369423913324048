"""lmgym: the IMDB text-continuation task of RL4LMs as a Gymnasium env, ``IMDBContinuation-v0``.

An agent writes a continuation of a movie-review prompt one token at a time and is rewarded, at the
end, for positive sentiment. ``info["ref_logits"]`` exposes the frozen reference model's next-token
logits so agents can apply any KL estimator.

    import gymnasium as gym, lmgym
    env = gym.make("IMDBContinuation-v0")
    envs = gym.make_vec("IMDBContinuation-v0", num_envs=16, vectorization_mode="vector_entry_point")

Importing lmgym loads no model: assets are loaded when an env is built.
"""

from gymnasium.envs.registration import register

register(
    id="IMDBContinuation-v0",
    entry_point="lmgym.env:IMDBContinuationEnv",
    vector_entry_point="lmgym.vector_env:IMDBContinuationVectorEnv",
    kwargs={
        "model": "smollm2-135m",
        "reward": "vader",
        "dataset": "bundled",
        "max_prompt_tokens": 64,
        "max_new_tokens": 48,
    },
)
