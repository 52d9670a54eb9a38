"""Online resharding: planning (pure), the runner, and the driver that runs it in a proxy."""
