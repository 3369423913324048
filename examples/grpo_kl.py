"""A GRPO-style update in plain PyTorch whose KL term comes from kl_estimators (torch only)."""
import copy

import torch

import kl_estimators as kl

V, T, G = 8, 6, 32  # vocabulary, completion length, completions per step


class TinyLM(torch.nn.Module):
    """Next-token logits from the previous token and the position: logits [B, T, V] for tokens [B, T]."""

    def __init__(self):
        super().__init__()
        self.token, self.position = torch.nn.Embedding(V, V), torch.nn.Parameter(torch.zeros(T, V))

    def forward(self, tokens):
        previous = torch.cat([torch.zeros_like(tokens[:, :1]), tokens[:, :-1]], dim=1)
        return self.token(previous) + self.position


def sample(model, n):
    tokens = torch.zeros(n, T, dtype=torch.long)
    with torch.no_grad():
        for t in range(T):
            tokens[:, t] = torch.distributions.Categorical(logits=model(tokens)[:, t]).sample()
    return tokens


def token_logprobs(logits, tokens):
    return logits.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def train(beta=0.1, steps=40, epochs=2, seed=0, estimator="analytic-future-is"):
    """GRPO with `epochs` optimisation steps per batch; returns the policy's KL to the reference."""
    torch.manual_seed(seed)
    policy = TinyLM()
    reference = copy.deepcopy(policy).requires_grad_(False)
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.05)
    mask = torch.ones(G, T, dtype=torch.bool)  # True at generated tokens
    for _ in range(steps):
        tokens = sample(policy, G)
        reward = (tokens == 3).float().sum(-1)  # the task: say token 3 often
        advantage = ((reward - reward.mean()) / (reward.std() + 1e-6)).unsqueeze(-1)
        with torch.no_grad():
            old_logprobs = token_logprobs(policy(tokens), tokens)  # the behaviour policy mu
            ref_logits = reference(tokens)
        for _ in range(epochs):  # after the first step pi != mu: the KL term needs mu
            logits = policy(tokens)
            logprobs = token_logprobs(logits, tokens)
            ratio = torch.exp(logprobs - old_logprobs)
            policy_loss = -torch.min(ratio * advantage, ratio.clamp(0.8, 1.2) * advantage)
            kl_loss = kl.per_token_kl_loss(
                estimator, logprobs, token_logprobs(ref_logits, tokens), mask, logits, ref_logits,
                behaviour_logprobs=old_logprobs,
            )
            loss = (policy_loss + beta * kl_loss)[mask].mean()  # token mean, a constant normaliser
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    tokens = sample(policy, 2048)
    with torch.no_grad():
        return float(kl.analytic(policy(tokens), reference(tokens)).sum(-1).mean())


if __name__ == "__main__":
    for beta in (0.0, 1.0):
        print(f"beta {beta}: KL(pi || pi_ref) = {train(beta):.3f}")
