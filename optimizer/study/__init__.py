"""Studies: a validated study file -> an Optuna study over merge recipes -> reports and exports."""
