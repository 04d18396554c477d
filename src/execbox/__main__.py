"""python -m execbox (the adapters are dispatched here and in bin/execbox, never by the
core's CLI)."""

import sys

if sys.argv[1:2] == ["worker"]:
    from .adapters.reapi.main import main as worker

    sys.exit(worker(sys.argv[2:]))
if sys.argv[1:2] == ["runner"]:
    from .adapters.buildbarn.main import main as runner

    sys.exit(runner(sys.argv[2:]))

from .cli.main import main

sys.exit(main())
