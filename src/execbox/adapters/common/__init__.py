"""What the adapters share: how an execbox Result is reported over gRPC (usage, setup
failures, cgroup usage, status codes), the same for `execbox worker` and `execbox runner`."""
