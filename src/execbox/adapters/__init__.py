"""Adapters onto distributed build engines. Each needs its extra (execbox[reapi],
execbox[buildbarn]); the core never imports this package."""
