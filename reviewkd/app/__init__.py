"""The application on top of every layer: the `reviewkd` command line, its commands, the orchestrator.

Nothing imports this package (an import-linter contract says so); the `reviewkd` entry point loads
`reviewkd.app.cli`, which loads the one command module it runs.
"""
