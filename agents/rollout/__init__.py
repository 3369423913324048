"""The rollout: sampling episodes, the step and sequence records, the buffer, advantages, action masks and pi_ref's scores."""
