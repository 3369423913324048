"""An SB3 policy wrapping a Hugging Face causal LM (the actor) with a value head.

Value function: V(s_t) = MLP(stopgrad(h_t)), where h_t is the LM's final hidden state at the last
token of s_t (the same state that produces the logits of a_t). Sharing the trunk costs no extra
forward pass, which matters on CPU (a separate critic LM would double every forward), and the
stop-gradient keeps the value loss from pulling on the language model: the LM is moved only by
the policy objective and the KL terms, so ``vf_coef`` never trades reward against value fit.
The head has its own (larger, constant) learning rate ``vf_learning_rate``.
``dtype="bfloat16"`` runs the LM under autocast with float32 master weights and
``gradient_checkpointing`` recomputes its layers' activations in backward (``agents.device``);
``lora_rank`` trains LoRA adapters only (``agents.lora``).
"""
from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import nn

from agents.device import autocast_forward, check_dtype, enable_activation_checkpointing, fp32_output_layer, set_checkpointing_active
from agents.lora import add_lora
from lmgym.assets import load_causal_lm
from lmgym.decoding import contiguous_output_layer, forward_last
from lmgym.task import output_vocab_size


def default_optimizer_kwargs(optimizer_class: type[torch.optim.Optimizer]) -> dict[str, Any]:
    """No weight decay; Adam(W) fused into one kernel over all parameters: the same update up to
    rounding, and 3.4x faster than torch's default per-parameter loop on CPU for SmolLM2-135M."""
    fused = {"fused": True} if optimizer_class in (torch.optim.Adam, torch.optim.AdamW) else {}
    return {"weight_decay": 0.0, **fused}


class CausalLMPolicy(BasePolicy):
    """Actor: a causal LM's next-token distribution; critic: an MLP head on its hidden state.

    Args:
        observation_space: the env's observation space (``input_ids``, ``attention_mask``).
        action_space: the env's action space, ``Discrete(V)``; V must be the model's vocabulary.
        lr_schedule: the policy's learning-rate schedule (given by PPOKL).
        model: the LM: ``"smollm2-135m"`` (embedded), a local folder or a Hub id.
        value_hidden_size: the value head's hidden width.
        vf_learning_rate: the value head's learning rate.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"`` for the LM's forward (autocast).
        gradient_checkpointing: recompute activations in the backward to save memory.
        cast_lm_head_to_fp32: run the output layer in float32 under autocast (``agents.device.fp32_output_layer``).
        lora_rank: > 0 trains LoRA adapters of this rank instead of the whole LM (needs peft).
        use_sde: must be False (SB3's argument; token actions are discrete).
        optimizer_class: the optimiser.
        optimizer_kwargs: its keyword arguments; None for the defaults.

    Raises:
        ValueError: ``use_sde`` is set or the model's vocabulary differs from the action space.
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Discrete,
        lr_schedule: Schedule,
        model: str = "smollm2-135m",
        value_hidden_size: int = 256,
        vf_learning_rate: float = 1e-4,
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        lora_rank: int = 0,
        cast_lm_head_to_fp32: bool = False,
        use_sde: bool = False,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
        optimizer_kwargs: dict[str, Any] | None = None,
    ):
        if use_sde:
            raise ValueError("use_sde is not supported by CausalLMPolicy (discrete token actions)")
        super().__init__(
            observation_space,
            action_space,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs or default_optimizer_kwargs(optimizer_class),
        )
        self.model_spec = model
        self.value_hidden_size = value_hidden_size
        self.vf_learning_rate = vf_learning_rate
        self.dtype = dtype
        self.gradient_checkpointing = gradient_checkpointing
        self.lora_rank = lora_rank
        self.cast_lm_head_to_fp32 = cast_lm_head_to_fp32
        self.lm = contiguous_output_layer(load_causal_lm(model)[0])
        if cast_lm_head_to_fp32:
            fp32_output_layer(self.lm)
        if lora_rank:
            add_lora(self.lm, lora_rank)
        if check_dtype(dtype) != torch.float32:
            autocast_forward(self.lm, check_dtype(dtype))
        if gradient_checkpointing:
            enable_activation_checkpointing(self.lm)
        vocab = output_vocab_size(self.lm)
        if vocab != action_space.n:
            raise ValueError(
                f"model {model!r} has {vocab} output logits but the environment's action space has "
                f"{action_space.n} tokens: the policy and the reference model must share one vocabulary"
            )
        hidden = self.lm.config.get_text_config().hidden_size
        self.value_head = nn.Sequential(nn.Linear(hidden, value_hidden_size), nn.Tanh(), nn.Linear(value_hidden_size, 1))
        nn.init.zeros_(self.value_head[-1].weight)
        nn.init.zeros_(self.value_head[-1].bias)
        self.optimizer = self.optimizer_class(
            [
                {"params": [p for p in self.lm.parameters() if p.requires_grad]},
                {"params": self.value_head.parameters(), "lr": vf_learning_rate, "fixed_lr": True},
            ],
            lr=lr_schedule(1),
            **self.optimizer_kwargs,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            model=self.model_spec,
            value_hidden_size=self.value_hidden_size,
            vf_learning_rate=self.vf_learning_rate,
            dtype=self.dtype,
            gradient_checkpointing=self.gradient_checkpointing,
            lora_rank=self.lora_rank,
            cast_lm_head_to_fp32=self.cast_lm_head_to_fp32,
        )
        return data

    def set_training_mode(self, mode: bool) -> None:
        """Dropout stays off in the LM: PPO ratios need the sampling distribution, not a noisy one."""
        super().set_training_mode(mode)
        self.lm.eval()
        set_checkpointing_active(self.lm, mode)

    def values_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """V(s) from final hidden states [..., H] (gradient stopped into the LM) -> [...]."""
        return self.value_head(hidden.detach().float()).squeeze(-1)

    def sequence_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_actions: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] for the last ``n_actions`` tokens of each row and V(s_t) [B, T].

        Token ``input_ids[:, L - T + t]`` is action t, so its logits come from position L - T + t - 1.
        """
        out = self._lm_forward(input_ids, attention_mask, logits_to_keep=n_actions + 1)
        logits = out.logits[:, :-1].float()
        hidden = out.hidden_states[-1][:, -n_actions - 1 : -1]
        return logits, self.values_from_hidden(hidden)

    def sequence_hidden(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_actions: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [B, T, H] at the states of ``sequence_forward``'s logits (the output
        layer applied to them gives those logits; it runs on one position per row only) and V(s_t)."""
        out = self._lm_forward(input_ids, attention_mask, logits_to_keep=1)
        hidden = out.hidden_states[-1][:, -n_actions - 1 : -1]
        return hidden, self.values_from_hidden(hidden)

    def _lm_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
        """One full forward over a padded batch, logits for the last ``logits_to_keep`` positions."""
        return forward_last(self.lm, input_ids, attention_mask, logits_to_keep, output_hidden_states=True)

    def _last_position(self, obs: PyTorchObs) -> tuple[torch.Tensor, torch.Tensor]:
        out = self._lm_forward(obs["input_ids"].long(), obs["attention_mask"].long(), logits_to_keep=1)
        return out.logits[:, -1].float(), self.values_from_hidden(out.hidden_states[-1][:, -1])

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, values = self._last_position(obs)
        dist = torch.distributions.Categorical(logits=logits)
        actions = logits.argmax(-1) if deterministic else dist.sample()
        return actions, values, dist.log_prob(actions)

    def evaluate_actions(self, obs: PyTorchObs, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """V(s), log pi(a | s) and H(pi(. | s)) at the last token of each observation (SB3's interface).

        Args:
            obs: a batch of observations, ``{"input_ids", "attention_mask"}`` each [N, L].
            actions: the tokens a, [N] or [N, 1].

        Returns:
            ``(values, log_prob, entropy)``, each [N].
        """
        logits, values = self._last_position(obs)
        dist = torch.distributions.Categorical(logits=logits)
        return values, dist.log_prob(actions.long().flatten()), dist.entropy()

    def predict_values(self, obs: PyTorchObs) -> torch.Tensor:
        """V(s) at the last token of each observation (SB3's interface).

        Args:
            obs: a batch of observations, ``{"input_ids", "attention_mask"}`` each [N, L].

        Returns:
            The values, [N, 1].
        """
        return self._last_position(obs)[1].unsqueeze(-1)

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> torch.Tensor:
        return self.forward(observation, deterministic)[0]
