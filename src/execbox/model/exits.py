"""Exit statuses `execbox run` shares with env(1) and timeout(1), and other shared literals."""

EXIT_TIMEOUT = 124
EXIT_SETUP_FAILED = 125
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
DEFAULT_TERM = "xterm-256color"  # TERM for a step on a pseudo-terminal
