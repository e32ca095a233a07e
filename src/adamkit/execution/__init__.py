"""Executors: how the update rule is run over the params of a group."""
