"""qerl_rollout."""
