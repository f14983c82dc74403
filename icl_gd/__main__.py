"""`python -m icl_gd ...` is `icl-gd ...`."""

from icl_gd.cli import app

app(prog_name="icl-gd")
