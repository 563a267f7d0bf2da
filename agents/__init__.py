"""Planning agents and the online RL loop."""
