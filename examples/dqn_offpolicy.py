"""keel on an off-policy RL loop with a target network, shaped as CleanRL's dqn.py: one line after the optimizer.

    python examples/dqn_offpolicy.py --steps 2000 --nan-weight 1200 --out runs/dqn
    python examples/dqn_offpolicy.py --steps 2000 --nan-weight 1200 --no-track --out runs/dqn_untracked

A Q-network learns a CartPole-like balance task (two actions, +1 per step alive, episodes of at most 200 steps) from a
replay buffer, with a target network that follows it by polyak averaging through ``.data``, as CleanRL writes it
(a hard copy every N steps makes a gradient spike at each copy, which keel warns about and, three in a row, rolls
back). keel watches
it with ``adversarial_detectors()`` (a TD loss rises as the values are learnt: docs/rl.md) under ``recover``, and the
target network is registered with ``guard.track``. ``--nan-weight STEP`` writes a NaN into the Q-network after that
environment step's update (a bad kernel, a bit flip), which the target network averages in at once: keel rolls the
Q-network back, and the target network with it. With ``--no-track`` the target keeps the NaN, every TD target after
it is NaN, and keel says so: the run ends in skips and an abort.
"""

from __future__ import annotations

import argparse
import copy
import random

import torch
import torch.nn.functional as F
from torch import nn

import keel
from keel.integrations.watch import adversarial_detectors

TAU = 0.005  # the target network's share of the Q-network per step


class Balance:
    """A pole to keep upright: the state drifts away from 0 on its own; the action pushes it left or right."""

    def reset(self) -> torch.Tensor:
        self.x, self.v, self.t = random.uniform(-0.1, 0.1), 0.0, 0
        return self.observation()

    def observation(self) -> torch.Tensor:
        return torch.tensor([self.x, 5 * self.v])

    def step(self, action: int) -> tuple[torch.Tensor, float, bool, bool]:
        self.v += (0.02 if action else -0.02) + random.gauss(0, 0.01) + 0.03 * self.x
        self.x += self.v
        self.t += 1
        return self.observation(), 1.0, abs(self.x) > 1, self.t >= 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="environment steps")
    parser.add_argument("--nan-weight", type=int, default=None, metavar="STEP")
    parser.add_argument("--no-track", action="store_true", help="do not register the target network with keel")
    parser.add_argument("--out", default="runs/dqn", help="run directory (the run store goes here)")
    args = parser.parse_args()

    random.seed(0)
    torch.manual_seed(0)
    q_network = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    target_network = copy.deepcopy(q_network)
    optimizer = torch.optim.Adam(q_network.parameters(), lr=1e-3)
    guard = keel.watch(
        q_network, optimizer, policy="recover", detectors=adversarial_detectors(), run_dir=args.out, overwrite=True
    )
    if not args.no_track:
        guard.track(target_network, name="target")  # a rollback restores it with the Q-network

    env, buffer, returns, episode_return = Balance(), [], [], 0.0
    obs = env.reset()
    try:
        for global_step in range(args.steps):
            epsilon = max(0.05, 1 - global_step / (0.5 * args.steps))
            with torch.no_grad():
                action = random.randrange(2) if random.random() < epsilon else int(q_network(obs[None]).argmax())
            next_obs, reward, terminated, truncated = env.step(action)
            buffer.append((obs, action, reward, next_obs, float(terminated)))
            episode_return += reward
            obs = next_obs
            if terminated or truncated:
                returns.append(episode_return)
                obs, episode_return = env.reset(), 0.0
            if global_step < 300:  # learning starts
                continue
            batch = random.sample(buffer[-10_000:], 64)
            observations, next_observations = torch.stack([b[0] for b in batch]), torch.stack([b[3] for b in batch])
            actions = torch.tensor([[b[1]] for b in batch])
            rewards, dones = torch.tensor([b[2] for b in batch]), torch.tensor([b[4] for b in batch])
            with torch.no_grad():
                td_target = rewards + 0.99 * target_network(next_observations).max(dim=1).values * (1 - dones)
            loss = F.mse_loss(td_target, q_network(observations).gather(1, actions).squeeze(1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # keel decides here: step, skip, or roll back (the target network with it)
            if global_step == args.nan_weight:
                with torch.no_grad():
                    q_network[0].weight[0, 0] = float("nan")
            for target_param, param in zip(target_network.parameters(), q_network.parameters(), strict=True):
                target_param.data.copy_(TAU * param.data + (1 - TAU) * target_param.data)
    except keel.TrainingAborted as aborted:
        print(f"aborted: {aborted}")
    finally:
        guard.close()
    for decision in guard.decisions:
        print(f"update {decision.step}: {decision.action} — {decision.reason[:120]}")
    finite = all(bool(torch.isfinite(p).all()) for p in target_network.parameters())
    print(f"mean return of the first / last 10 episodes: {sum(returns[:10]) / 10:.1f} / {sum(returns[-10:]) / 10:.1f}")
    print(f"target network finite: {finite}; run store: {args.out}/run.sqlite")


if __name__ == "__main__":
    main()
