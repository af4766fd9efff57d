"""configs/: Hydra config groups, shipped in the wheel as ``neuroada_cli.configs`` (see paths.configs_dir)."""
