"""What people read: the plan table of a dry run (explain), coordinate-check tables and plots, tune and
sweep plots and fits, and the loggers (TensorBoard, W&B, CSV). Reads results of run/; never trains."""
