"""``python -m bench.gpu_check``: see the package's docstring."""
from bench.gpu_check import cli

cli()
