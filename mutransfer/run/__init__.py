"""How a model is trained and measured: the recipe, the experiment it describes (factories, data,
config), THE training loop (train), batched trials (several trials stacked in one model), checkpoints,
torch.distributed, metrics, Optuna storages and the coordinate check's measurements. Built on engine/."""
