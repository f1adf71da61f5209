"""Hardware targets: recipes (recipes/*.toml) and the build that makes and validates their artifacts."""
