"""The YAML profiles shipped with moeport, found by name with `--profile NAME`."""
