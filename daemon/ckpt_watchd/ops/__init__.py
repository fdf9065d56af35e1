"""How operators see and drive the daemon: metrics, sd_notify, hooks, status."""
