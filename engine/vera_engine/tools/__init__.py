"""The `vera-engine` command line and the commands that are tools rather than parts of the engine: the demo,
the step benchmark and Wan checkpoint conversion."""
