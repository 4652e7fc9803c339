"""Pipeline stages: thin Typer commands that load params.yaml into configs and call `llm`."""
