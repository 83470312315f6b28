"""The state directory: machine directories and daemon status, written atomically."""
