"""Per-step cgroups, created only below execbox's own current cgroup (v1, v2 or hybrid)."""
