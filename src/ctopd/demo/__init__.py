"""The built-in demo: a synthetic arithmetic task, locally trained tokenizers and tiny models."""
