"""Package data: the open_clip config of the tiny test model and default concept configs."""
