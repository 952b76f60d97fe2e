"""The model package: its card, what its artifacts are called, which precision serves, and
opening it with every sha256 checked. Nothing here writes a model."""
