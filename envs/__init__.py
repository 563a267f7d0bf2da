"""Gymnasium side of loopwm: environment factory, wrappers and the world-model environment."""
