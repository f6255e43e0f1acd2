"""The floor every layer stands on: config composition and keys, the plugin registry, error types, progress."""
