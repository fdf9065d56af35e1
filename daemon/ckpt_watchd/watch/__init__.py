"""What is on disk and when a run is done: path rules, the settle tracker, the watcher, the writers."""
