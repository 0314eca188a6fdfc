"""Continuous batching: many streams share each decode step of one worker's model."""
