"""Stability analyses of trained looped world models."""
