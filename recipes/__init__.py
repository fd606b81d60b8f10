"""attnpatch's shipped recipes (YAML files), installed as ``attnpatch.recipe_files``."""
