"""One module per params.yaml section, each holding that section's config (llm/config.py: how they are declared
and checked), so that a stage imports, and dvc.yaml lists, only the configs of the sections it reads.

Left empty on purpose: importing `llm.configs.train` runs this file, and it must not import the others.
"""
