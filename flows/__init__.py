"""Prefect wiring only: one flow per recipe, tasks around stages/filters, the `alignforge` CLI."""
