"""The experiment scripts, a package so each runs as a module from the repository root:

    .venv/bin/python -m experiments.chunk_sweep --quick

Importing a script runs nothing (each has `main(argv=None)`); shared helpers are in
`experiments.common`. Not part of the installed `jaxchunk` package: a source checkout only.
"""
