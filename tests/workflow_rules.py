"""Facts about the workflow's rules that several test modules check against."""

# Rules that run an experiment's command -> the config entry of its settings;
# every other rule is a local rule (aggregation, plots, tables, claims).
RULE_EXPERIMENTS = {
    "linear_weights": "linear_weights",
    "reconstruction": "reconstruction",
    "train_tied": "tied_weights",
    "train_resnet101": "resnet101",
    "train_depth_sweep": "depth_sweep",
    "gradient_error": "gradient_error",
    "memory_point": "memory",
    "finetune": "finetuning",
}
