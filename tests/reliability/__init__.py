"""Reliability suite: hostile inputs, fuzzing, worker crashes, I/O errors, missed events, live runs."""
