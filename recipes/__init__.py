"""recipes/: the packaged recipes, shipped in the wheel as ``neuroada_cli.recipes`` (see paths.recipes_dir)."""
