"""Steering a policy with a preference model: RL (PPO, RLOO) and its pure functions."""
