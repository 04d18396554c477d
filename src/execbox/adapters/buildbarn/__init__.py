"""`execbox runner`: a drop-in for Buildbarn's bb_runner (the buildbarn.runner.Runner gRPC
service bb_worker calls), running every action through execbox. See docs/buildbarn-runner.md."""
